//! The upstream client: everything between a request ready to leave and the upstream's answer.
//! It chooses HTTP/1.1 or HTTP/2 per origin (ALPN), owns the connection pools and the per-upstream
//! connection limits, applies the hop-by-hop rules and reports one error type, which the proxy maps
//! to responses in one place. Nothing here knows about routes, tokens or the request phases
//! ([`crate::proxy`]).
//!
//! - [`h1`]: the lean HTTP/1.1 client, a keep-alive pool per worker thread;
//! - [`h2`]: HTTP/2 connections per worker, on the `h2` crate;
//! - [`origin`]: one upstream as routes reach it, choosing between the two;
//! - [`pooled`]: hyper's client, for uploads too large to buffer to HTTP/1.1 origins;
//! - [`stream`]: TCP and TLS connections; [`limit`]: connection slots; [`hop`]: hop-by-hop rules;
//! - [`body`]: the body type of every message; [`Tunnel`]: a connection after an upgrade.

pub mod body;
mod client;
pub mod egress;
pub mod h1;
pub mod h2;
pub mod hop;
pub mod limit;
pub mod origin;
pub mod pooled;
pub mod stream;
mod tunnel;

pub use body::{Body, BoxError};
pub use client::{Client, Clients, Error, Payload, Reach, Upgrade};
pub use tunnel::Tunnel;
