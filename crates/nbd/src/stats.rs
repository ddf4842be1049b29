//! Per-export counters, shared by all connections to the export.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of an export's counters (see [`Server::stats`](crate::Server::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Connections in the transmission phase now.
    pub connections: u64,
    /// Connections that reached the transmission phase since the export was added.
    pub total_connections: u64,
    /// Completed READ requests.
    pub reads: u64,
    /// Completed WRITE requests.
    pub writes: u64,
    /// Bytes returned by READ.
    pub bytes_read: u64,
    /// Bytes stored by WRITE.
    pub bytes_written: u64,
    /// Completed FLUSH requests.
    pub flushes: u64,
    /// Completed TRIM requests.
    pub trims: u64,
    /// Completed WRITE_ZEROES requests.
    pub zeroes: u64,
    /// Completed BLOCK_STATUS requests.
    pub block_status: u64,
    /// Requests answered with an error (refused or failed).
    pub errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    pub connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub block_status: AtomicU64,
    pub errors: AtomicU64,
}

impl StatsCounters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> ExportStats {
        ExportStats {
            connections: self.connections.load(Relaxed),
            total_connections: self.total_connections.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            trims: self.trims.load(Relaxed),
            zeroes: self.zeroes.load(Relaxed),
            block_status: self.block_status.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}
