//! Guest integration services for Vireo VMs, both ends, over the QEMU guest agent (QGA)
//! protocol on the virtio-serial port `org.qemu.guest_agent.0`.
//!
//! This crate owns:
//! * [`protocol`]: the wire types of the standard QGA commands Vireo uses and of Vireo's
//!   `vireo-*` extensions (key-value pairs both ways, guest memory status, streamed exec
//!   output);
//! * [`client::AgentClient`]: the host side (tokio), used by the per-VM worker, which copes
//!   with absent, restarting and stale agents (sync with delimiter, timeouts, resync);
//! * [`heartbeat::Heartbeat`]: the pure `ok | lost | no-contact` policy;
//! * [`guest`]: the guest side, blocking std code served by the static `vireo-guest`
//!   binary that the test guests carry.
//!
//! A guest with plain qemu-ga gets every standard service; the extensions need
//! vireo-guest ([`client::AgentClient::supports_vireo_extensions`]). This crate must not
//! know about VMs beyond one agent socket: starting QEMU and deciding when to ping are the
//! worker's job.

#![warn(missing_docs)]

pub mod client;
pub mod framing;
pub mod guest;
pub mod heartbeat;
pub mod protocol;
#[cfg(feature = "test-utils")]
pub mod testing;

pub use client::{
    AgentClient, AgentError, ClientOptions, ErrorKind, ExecExit, ExecStatus, RunEvent, RunRequest,
};
pub use heartbeat::{Heartbeat, HeartbeatState};
pub use protocol::{KvpPool, MemoryStatus, ShutdownMode};
