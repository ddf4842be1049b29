//! One module per command group.
pub mod bench;
pub mod disk;
pub mod host;
pub mod output;
pub mod vm;
