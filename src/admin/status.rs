//! The status page: `GET /` serves one self-contained HTML page (no external assets, no build
//! step) that polls `GET /status.json`. Neither shows a token or a secret: providers are their
//! [`crate::token::Status`], routes their prefix, upstream, provider and request counts.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::readiness::Phase;
use crate::reload::Control;

/// The page. Values from the server are inserted with `textContent`, never as HTML.
pub const PAGE: &str = include_str!("status.html");

/// `Content-Security-Policy` of the page: its own inline script and style, requests only to
/// this listener, and never inside a frame (the reload button must not be clickjacked).
pub const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                       connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Each provider's state (no token values) and type, by name: `/tokens` and the page.
pub fn providers(providers: &crate::token::Providers) -> serde_json::Map<String, serde_json::Value> {
    providers
        .iter()
        .map(|(name, p)| {
            let mut v = serde_json::to_value(p.status()).unwrap_or_default();
            v["type"] = match p.config() {
                crate::config::Provider::OAuth2(_) => "oauth2",
                crate::config::Provider::Http(_) => "http",
                crate::config::Provider::Static(_) => "static",
            }
            .into();
            (name.clone(), v)
        })
        .collect()
}

/// What the page shows, as JSON.
pub fn json(control: &Control) -> serde_json::Value {
    let proxy = control.proxy();
    let runtime = proxy.runtime.load();
    let providers = providers(&runtime.providers);
    let totals = proxy.metrics.route_totals();
    let routes: Vec<serde_json::Value> = runtime
        .routes
        .iter()
        .map(|route| {
            let (requests, errors) = totals.get(&route.label).copied().unwrap_or_default();
            serde_json::json!({
                "name": route.label,
                "prefix": route.prefix,
                "upstream": route.upstream.to_string(),
                "provider": route.provider.name(),
                "requests": requests,
                "errors_5xx": errors,
            })
        })
        .collect();
    let callers: Vec<serde_json::Value> = proxy
        .metrics
        .caller_totals()
        .into_iter()
        .map(|((route, caller), requests)| serde_json::json!({ "route": route, "caller": caller, "requests": requests }))
        .collect();
    let (file, loaded, digest) = control.loaded();
    let readiness = match control.readiness.phase() {
        Phase::WarmingUp => "warming up",
        Phase::Serving => "ready",
        Phase::ShuttingDown => "shutting down",
    };
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_unix": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        "readiness": readiness,
        "config": { "file": file, "loaded_unix": loaded, "digest": digest },
        "reload_enabled": control.admin().reload,
        "providers": providers,
        "routes": routes,
        "callers": callers,
    })
}
