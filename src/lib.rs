//! tokengate: an authenticating reverse proxy. Legacy apps send plain requests; tokengate picks
//! a route by longest path prefix, attaches a cached access token from the route's identity
//! provider and forwards to the upstream over TLS.
//!
//! The file tree is the architecture: [`config`] (schema and loading), [`route`] (prefix table,
//! path checks), [`proxy`] (the request path), [`token`] (providers, cache, refresh), [`admin`]
//! and [`metrics`] (observability), [`server`] (listeners, shutdown, reload), [`demo`].

pub mod admin;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod secret;
pub mod server;
pub mod tls;
pub mod token;
