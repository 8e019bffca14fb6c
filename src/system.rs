//! A configuration turned into what serves it: token sources, routes with their upstream
//! clients, and the TLS listener's certificate. Start-up, `check` and reload all build with
//! [`build`], so each accepts and refuses exactly what the others do.

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Runtime;
use crate::token::{self, Providers, TokenSource};

/// What [`build`] made.
pub struct System {
    /// Routes, upstream clients and token sources.
    pub runtime: Runtime,
    /// The TLS listener's settings, when the configuration has one.
    pub server_tls: Option<rustls::ServerConfig>,
    /// The token sources made now (not kept from `running`): not started yet, without a token.
    pub fresh: Vec<Arc<TokenSource>>,
}

/// Builds everything `config` needs except the listeners. A token source in `running` whose
/// settings are unchanged is kept (with its cached token), under its name or another one; so is
/// one this configuration names twice.
pub fn build(config: &Config, metrics: &Metrics, running: &Providers) -> Result<System, String> {
    let shared = token::shared_cache(config)?;
    let mut providers = Providers::new();
    let mut fresh = Vec::new();
    for (name, settings) in &config.providers {
        let same = |p: &&Arc<TokenSource>| p.config() == settings;
        let kept = running
            .get(name)
            .filter(same)
            .or_else(|| running.values().find(same))
            .or_else(|| providers.values().find(same))
            .cloned();
        let source = match kept {
            Some(source) => source,
            None => {
                let source = TokenSource::new(name, settings, metrics.clone(), shared.clone())?;
                fresh.push(source.clone());
                source
            }
        };
        providers.insert(name.clone(), source);
    }
    token::settle_token_types(config, &providers);
    let runtime = Runtime::build(config, providers, metrics)?;
    let server_tls = config.tls.as_ref().map(crate::tls::inbound).transpose().map_err(|e| e.to_string())?;
    Ok(System { runtime, server_tls, fresh })
}
