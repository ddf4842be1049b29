//! NBD server library: the Network Block Device protocol over any async
//! byte stream (unix socket, loopback TCP, or anything `AsyncRead +
//! AsyncWrite`).
//!
//! It owns the protocol only: fixed newstyle negotiation (`NBD_OPT_GO`,
//! `INFO`, `LIST`, `ABORT`, `EXPORT_NAME`, `STRUCTURED_REPLY`,
//! `LIST/SET_META_CONTEXT`; `STARTTLS` is refused with
//! `NBD_REP_ERR_POLICY`), structured replies, block status with
//! `base:allocation`, and the commands READ, WRITE (FUA), FLUSH, TRIM,
//! WRITE_ZEROES (fast zero), CACHE, BLOCK_STATUS and DISC, with many
//! requests in flight per connection and out-of-order replies.
//!
//! It must not know about image formats: it serves anything implementing
//! [`Export`]. [`MemExport`] and [`FileExport`] are provided; the disk
//! service implements [`Export`] over VHDX chains.
//!
//! ```no_run
//! # async fn run() -> Result<(), nbd::Error> {
//! use std::sync::Arc;
//! let server = nbd::Server::new(nbd::ServerConfig::default())?;
//! server.add_export("disk0", Arc::new(nbd::MemExport::new(1 << 30)))?;
//! let listener = nbd::bind_unix("/run/vireo/disk0.sock")?;
//! let stop = server.shutdown_token();
//! tokio::spawn(async move { tokio::signal::ctrl_c().await.ok(); stop.cancel() });
//! server.serve_unix(listener).await
//! # }
//! ```

#![warn(missing_docs)]

mod error;
mod export;
mod handshake;
mod proto;
mod reply;
mod request;
mod server;
mod stats;

pub use error::{Errno, Error, ErrorKind};
pub use export::{
    write_zero_buffers, BlockSize, Export, ExportFlags, Extent, FileExport, MemExport, ZeroMode,
};
pub use handshake::HandshakeError;
pub use server::{bind_unix, ConnectionError, Server, ServerConfig};
pub use stats::ExportStats;
