//! One module per command group.
pub mod bench;
pub mod bench_memory;
pub mod bench_migration;
pub mod bench_switch;
pub mod checkpoint;
pub mod disk;
pub mod host;
pub mod memory;
pub mod migrate;
pub mod move_storage;
pub mod nic;
pub mod output;
pub mod replica;
pub mod replica_bench;
pub mod serve;
pub mod switch;
pub mod vm;
