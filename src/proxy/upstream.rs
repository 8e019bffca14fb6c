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
use crate::config::Limits;

/// A pooled client for upstream requests; every connection holds one of its upstream's slots.
pub type UpstreamClient = Client<HttpsConnector<Limited<HttpConnector>>, Body>;

/// Builds a client trusting the public roots plus `ca_file`.
pub fn client(
    limits: &Limits,
    ca_file: Option<&std::path::Path>,
    slots: &Arc<UpstreamSlots>,
) -> Result<UpstreamClient, crate::tls::TlsError> {
    // hyper-rustls sets ALPN (h2, http/1.1) itself from enable_all_versions().
    let tls = crate::tls::client_config(ca_file, &[])?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(limits.upstream_connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(Limited::new(http, slots.clone()));
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(limits.upstream_idle_timeout)
        .pool_max_idle_per_host(256)
        .build(connector))
}

/// Clients keyed by CA file, so routes with the same trust share one pool.
#[derive(Default)]
pub struct Clients(HashMap<Option<PathBuf>, UpstreamClient>);

impl Clients {
    /// The client for `ca_file`, built on first use.
    pub fn get(
        &mut self,
        limits: &Limits,
        ca_file: Option<&PathBuf>,
        slots: &Arc<UpstreamSlots>,
    ) -> Result<UpstreamClient, crate::tls::TlsError> {
        if let Some(c) = self.0.get(&ca_file.cloned()) {
            return Ok(c.clone());
        }
        let c = client(limits, ca_file.map(PathBuf::as_path), slots)?;
        self.0.insert(ca_file.cloned(), c.clone());
        Ok(c)
    }
}
