//! tokengate: an authenticating reverse proxy. Legacy apps send plain requests; tokengate picks
//! a route by longest path prefix, attaches a cached access token from the route's identity
//! provider and forwards to the upstream over TLS.
//!
//! The file tree is the architecture: [`config`] (schema, loading, access rules), [`route`] (prefix
//! table, path checks), [`caller`] (who is calling: API keys, JWTs, addresses), [`proxy`] (admission, the request path, header hygiene), [`upstream`] (the upstream client: pools, HTTP/1.1 and HTTP/2, connection limits),
//! [`token`] (OAuth2 and declarative flows, cache, refresh, shared cache), [`admin`] and
//! [`metrics`] and [`access_log`] (observability), [`server`] (listeners, TLS, shutdown, reload), [`tls`], [`secret`],
//! [`demo`].

pub mod access_log;
pub mod admin;
pub mod caller;
pub mod config;
pub mod demo;
pub mod jose;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod reload;
pub mod route;
pub mod secret;
pub mod server;
pub mod system;
pub mod text;
pub mod tls;
pub mod token;
pub mod trace;
pub mod upstream;
