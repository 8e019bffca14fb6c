//! Pooled upstream clients: HTTP/1.1 and HTTP/2 (ALPN) over rustls, plain http allowed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::Body;
use super::limit::{Limited, UpstreamSlots};
use crate::config::{Limits, ProxyUrl};

/// A client for streamed uploads; every connection holds one of its upstream's slots until it
/// closes, which it does when its exchange ends.
pub type UpstreamClient = Client<HttpsConnector<Limited<super::egress::Connector<HttpConnector>>>, Body>;

/// One client per worker thread: each holds its own connections (one HTTP/2 connection per
/// upstream, or an HTTP/1.1 pool), driven by that worker's event loop, so a second worker adds a
/// second connection's worth of TLS and framing instead of queueing behind the first.
#[derive(Clone)]
pub struct WorkerClients(Arc<[UpstreamClient]>);

impl WorkerClients {
    /// The calling worker's client.
    pub fn get(&self) -> &UpstreamClient {
        &self.0[super::h1::worker() % self.0.len()]
    }
}

/// Builds a client trusting the public roots plus `ca_file`.
fn client(
    limits: &Limits,
    tls: rustls::ClientConfig,
    slots: &Arc<UpstreamSlots>,
    proxy: Option<&ProxyUrl>,
    server_name: Option<&str>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(limits.upstream_connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    // Checked when the configuration loaded; a name that does not parse keeps the URI's host.
    let fixed = server_name.and_then(|n| rustls::pki_types::ServerName::try_from(n.to_owned()).ok());
    let builder = match fixed {
        Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name)),
        None => builder,
    };
    let connector = builder
        .enable_all_versions()
        .wrap_connector(Limited::new(super::egress::Connector::new(http, proxy.cloned()), slots.clone()));
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(limits.upstream_idle_timeout)
        // No idle connections: this client only carries uploads too large to buffer, and an idle
        // connection in hyper's pool would keep its upstream slot where no waiting request can
        // close it (after upstream_max_connections such uploads, every request got 503). A new
        // connection per large upload costs little beside the upload.
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// What the client trusts: a CA bundle besides the public roots, and the name the upstream's
/// certificate must carry when it is not the URI's host.
#[derive(Clone, Copy)]
pub struct Trust<'a> {
    /// The CA bundle.
    pub ca_file: Option<&'a PathBuf>,
    /// The certificate's name.
    pub server_name: Option<&'a str>,
}

/// Clients keyed by their TLS settings (CA file, client certificate files), so routes with the
/// same trust and identity share one pool.
#[derive(Default)]
pub struct Clients(HashMap<String, WorkerClients>);

impl Clients {
    /// The client for `trust`, presenting `identity` (read from `identity_key`'s files) and
    /// connecting through `proxy`, built on first use.
    pub fn get(
        &mut self,
        limits: &Limits,
        trust: Trust<'_>,
        identity: Option<(&str, crate::tls::Identity)>,
        slots: &Arc<UpstreamSlots>,
        proxy: Option<&ProxyUrl>,
    ) -> Result<WorkerClients, crate::tls::TlsError> {
        let Trust { ca_file, server_name } = trust;
        let key = format!(
            "{}|{}|{}|{}",
            server_name.unwrap_or_default(),
            ca_file.map(|p| p.display().to_string()).unwrap_or_default(),
            identity.as_ref().map_or("", |(k, _)| k),
            super::client::proxy_key(proxy),
        );
        if let Some(c) = self.0.get(&key) {
            return Ok(c.clone());
        }
        // hyper-rustls sets ALPN (h2, http/1.1) itself from enable_all_versions().
        let tls =
            crate::tls::client_config_with(ca_file.map(PathBuf::as_path), &[], identity.map(|(_, id)| id))?;
        let c = WorkerClients(
            (0..super::h1::SHARDS).map(|_| client(limits, tls.clone(), slots, proxy, server_name)).collect(),
        );
        self.0.insert(key, c.clone());
        Ok(c)
    }
}
