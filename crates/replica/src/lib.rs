//! `replica`: Vireo Replica, asynchronous replication of a VM's disks to another host.
//!
//! It owns:
//! - [`cycle`]: the replication cycle format (the changed grains of every disk of a VM cut
//!   at one instant, LZ4-compressed, checksummed end to end) and its strict reader;
//! - [`store`]: the replica side, recovery points as a chain of differencing VHDX layers,
//!   a cycle applied wholly or not at all, retention of the newest points;
//! - [`primary`]: cutting a cycle (partial while the initial copy runs, then
//!   crash-consistent) from the disk service's trackers into a file, commit and abort;
//! - [`resync`]: the checksum resync (per-MiB SHA-256 compare of both sides, only
//!   differing blocks marked for shipping) when change tracking cannot be trusted;
//! - [`seed`]: seeding a replica from an export on removable media or an existing copy
//!   (then a checksum resync ships only what differs);
//! - [`transport`]: a cycle over a byte stream (the mutual-TLS host channel) and the
//!   replica's answer, which is what lets the primary commit its change tracker.
//!
//! Change tracking and the consistent capture on the primary live in the disk service
//! (`storage::tracking`). This crate must not drive QEMU or own VMs, and it does not open
//! network connections itself: the daemon carries cycles over the mutual-TLS host channel.
#![warn(missing_docs)]

pub mod cycle;
pub mod primary;
pub mod resync;
pub mod seed;
pub mod store;
pub mod transport;

pub use cycle::{read_cycle, Block, CycleError, CycleHeader, CycleWriter};
pub use primary::{cut_streaming, cut_to_file, cut_to_file_marked, CutError, CutStats};
pub use resync::{ResyncError, ResyncStats, Sums, SUM_BLOCK};
pub use store::{points_to_drop, ErrorKind, Point, ReplicaStore, StoreError};
pub use transport::{
    answer_cycle, error_chain, read_json, read_shipped, receive_cycle, receive_streamed,
    send_cycle, send_cycle_from, write_json, StreamSender, TransportError,
};
