//! One module per command group.
pub mod disk;
pub mod host;
pub mod output;
pub mod vm;
