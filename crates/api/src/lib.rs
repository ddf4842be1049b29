//! Vireo's API: the REST types shared by `vireod`, `vireo-worker` and the `vireo` CLI,
//! their validation, and the unix-socket HTTP client.
//!
//! This crate must not depend on axum or hold routes: routes and auth live in `vireod`.
#![warn(missing_docs)]
// The workspace MSRV is 1.80: keep `%` over `is_multiple_of`.

pub mod checkpoint;
pub mod client;
pub mod memory;
pub mod migration;
pub mod replica;
pub mod storage_move;
pub mod switch;
pub mod types;
pub mod units;
pub mod validate;
pub mod worker;

pub use client::{Client, ClientError};
pub use types::*;
