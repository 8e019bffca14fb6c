//! The checks between keys that types cannot express: references to providers and callers,
//! where a provider's tokens may go, and settings that need one another.

use std::collections::HashSet;
use std::path::PathBuf;

use super::*;

/// Every check, in the order a reader of the file would want them: an error names the key.
pub(super) fn check(config: &mut Config) -> Result<(), (String, String)> {
    if config.routes.is_empty() {
        return Err(("routes".into(), "at least one route is needed".into()));
    }
    resolve_egress(config, &|name| std::env::var(name).ok())?;
    check_exchanges(config)?;
    let mut seen = HashSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        if !config.providers.contains_key(&route.provider.0) {
            let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
            return Err((
                format!("routes[{i}].provider"),
                format!(
                    "no provider named {:?}; defined providers: {}",
                    route.provider.0,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
            ));
        }
        // A provider's tokens go only where it allows: a route sending them elsewhere (a typo,
        // or a config change made without the IdP owner) is refused.
        let allowed = &config.providers[&route.provider.0].common().allowed_upstreams;
        if !allowed.is_empty() && !allowed.iter().any(|a| a.allows(&route.upstream.to_string())) {
            let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            return Err((
                format!("routes[{i}].upstream"),
                format!(
                    "route {} sends provider {}'s tokens to {}, which is not in its allowed_upstreams ({})",
                    route.label(),
                    route.provider.0,
                    route.upstream,
                    list.join(", ")
                ),
            ));
        }
        if !seen.insert(route.prefix.as_str()) {
            return Err((
                format!("routes[{i}].prefix"),
                format!("prefix {:?} is used by an earlier route", route.prefix.as_str()),
            ));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        check_route(config, i, route)?;
    }
    check_listeners(config)
}

/// One route's keys that need one another or a listener.
fn check_route(config: &Config, i: usize, route: &RouteConfig) -> Result<(), (String, String)> {
    if route.require_api_key == Some(true) && config.access.api_keys.is_none() {
        return Err((
            format!("routes[{i}].require_api_key"),
            "no keys are configured; add access.api_keys".into(),
        ));
    }
    check_callers(config, i, route)?;
    if route.websocket_max_lifetime.is_some() && !route.websocket() {
        return Err((
            format!("routes[{i}].websocket_max_lifetime"),
            "applies to WebSocket tunnels; add websocket: true".into(),
        ));
    }
    if route.server_name.is_some() && route.upstream.scheme != http::uri::Scheme::HTTPS {
        return Err((
            format!("routes[{i}].server_name"),
            format!("applies to TLS; the upstream {} is plain http", route.upstream),
        ));
    }
    if let Some(name) = &route.server_name
        && rustls::pki_types::ServerName::try_from(name.0.as_str()).is_err()
    {
        return Err((
            format!("routes[{i}].server_name"),
            format!("{:?} is not a host name or address", name.0),
        ));
    }
    match (&route.client_cert_file, &route.client_key_file) {
        (Some(_), None) => {
            return Err((format!("routes[{i}].client_cert_file"), "needs client_key_file".into()));
        }
        (None, Some(_)) => {
            return Err((format!("routes[{i}].client_key_file"), "needs client_cert_file".into()));
        }
        (Some(_), Some(_)) if route.upstream.scheme != http::uri::Scheme::HTTPS => {
            return Err((
                format!("routes[{i}].client_cert_file"),
                format!("a client certificate needs TLS; the upstream {} is plain http", route.upstream),
            ));
        }
        _ => {}
    }
    if route.require_client_cert && config.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none()) {
        return Err((
            format!("routes[{i}].require_client_cert"),
            "needs a TLS listener with client_ca_file (tls.client_ca_file)".into(),
        ));
    }
    Ok(())
}

/// Client certificates need a TLS listener that verifies them; the listeners differ.
fn check_listeners(config: &Config) -> Result<(), (String, String)> {
    let by_cert =
        config.callers.0.iter().find(|(_, c)| c.methods.iter().any(|m| m.kind() == MethodKind::ClientCert));
    if let Some((name, _)) = by_cert
        && config.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none())
    {
        return Err((
            format!("callers.{name}.client_cert"),
            "needs a TLS listener that verifies client certificates (tls.client_ca_file)".into(),
        ));
    }
    if let Some(tls) = &config.tls
        && tls.client_cert.is_some()
        && tls.client_ca_file.is_none()
    {
        return Err(("tls.client_cert".into(), "needs tls.client_ca_file to verify certificates".into()));
    }
    if config.limits.max_connections == 0 {
        return Err(("limits.max_connections".into(), "must be at least 1".into()));
    }
    if config.listen == config.admin.listen && config.listen.port() != 0 {
        return Err((
            "admin.listen".into(),
            format!("the admin listener must not share the proxy address {}", config.listen),
        ));
    }
    Ok(())
}

/// The providers whose exchanges take other providers' tokens name providers that exist,
/// without a cycle; an exchange of the caller's token needs callers known by JWT.
fn check_exchanges(config: &Config) -> Result<(), (String, String)> {
    let links = |name: &str| -> Vec<(String, &'static str)> {
        let Some(Provider::OAuth2(p)) = config.providers.get(name) else { return Vec::new() };
        let Grant::TokenExchange(x) = &p.grant else { return Vec::new() };
        let mut out = Vec::new();
        if let TokenFrom::Provider(n) = &x.subject.from {
            out.push((n.clone(), "subject_token_provider"));
        }
        if let Some(ExchangeToken { from: TokenFrom::Provider(n), .. }) = &x.actor {
            out.push((n.clone(), "actor_token_provider"));
        }
        out
    };
    for name in config.providers.keys() {
        for (target, key) in links(name) {
            let at = format!("providers.{name}.token_exchange.{key}");
            if !config.providers.contains_key(&target) {
                return Err((at, format!("no provider named {target:?}")));
            }
            // Follow the chain from the target: it must not come back here.
            let (mut seen, mut next) = (Vec::new(), vec![target]);
            while let Some(n) = next.pop() {
                if n == *name {
                    return Err((
                        at,
                        format!("providers take each other's tokens in a cycle through {name:?}"),
                    ));
                }
                if !seen.contains(&n) {
                    next.extend(links(&n).into_iter().map(|(t, _)| t));
                    seen.push(n);
                }
            }
        }
        if let Some(Provider::OAuth2(p)) = config.providers.get(name)
            && let Grant::TokenExchange(x) = &p.grant
            && x.subject.from == TokenFrom::Caller
            && !config.callers.0.iter().any(|(_, c)| c.methods.iter().any(|m| m.kind() == MethodKind::Jwt))
        {
            return Err((
                format!("providers.{name}.token_exchange.subject_token"),
                "exchanges the caller's token: define a caller known by jwt (callers.<name>.jwt)".into(),
            ));
        }
    }
    Ok(())
}

/// A route's `callers` and `provider_by_caller` name defined callers and providers, and the
/// providers may send their tokens to the route's upstream.
fn check_callers(config: &Config, i: usize, route: &RouteConfig) -> Result<(), (String, String)> {
    let defined: Vec<&str> = config.callers.0.iter().map(|(n, _)| n.as_str()).collect();
    let unknown = |name: &str| {
        format!(
            "no caller named {name:?}; defined callers: {}",
            if defined.is_empty() { "none".into() } else { defined.join(", ") }
        )
    };
    for name in &route.callers {
        if config.callers.get(&name.0).is_none() {
            return Err((format!("routes[{i}].callers"), unknown(&name.0)));
        }
    }
    for (caller, provider) in &route.provider_by_caller {
        let key = format!("routes[{i}].provider_by_caller.{caller}");
        if config.callers.get(caller).is_none() {
            return Err((key, unknown(caller)));
        }
        if !route.callers.is_empty() && !route.callers.iter().any(|c| c.0 == *caller) {
            return Err((key, format!("caller {caller:?} is not in this route's callers")));
        }
        let Some(p) = config.providers.get(&provider.0) else {
            return Err((key, format!("no provider named {:?}", provider.0)));
        };
        let allowed = &p.common().allowed_upstreams;
        if !allowed.is_empty() && !allowed.iter().any(|a| a.allows(&route.upstream.to_string())) {
            return Err((
                key,
                format!("provider {} may not send its tokens to {}", provider.0, route.upstream),
            ));
        }
    }
    Ok(())
}

/// Settles how every provider and route reaches its destination (the top-level `egress_proxy`,
/// `no_proxy` and password, or its own `egress_proxy`); an error names the key.
fn resolve_egress(config: &mut Config, env: egress::Env<'_>) -> Result<(), (String, String)> {
    let defaults = egress::Defaults {
        setting: config.egress_proxy.as_ref(),
        password: config.egress_proxy_password_file.as_ref(),
        no_proxy: &config.no_proxy,
    };
    for (name, provider) in config.providers.iter_mut() {
        let common = provider.common_mut();
        common.egress = egress::resolve(common.egress_proxy.as_ref(), &defaults, env)
            .map_err(|e| (format!("providers.{name}.egress_proxy"), e))?;
    }
    for (i, route) in config.routes.iter_mut().enumerate() {
        route.egress = egress::resolve(route.egress_proxy.as_ref(), &defaults, env)
            .map_err(|e| (format!("routes[{i}].egress_proxy"), e))?;
    }
    Ok(())
}

/// The files `read` while parsing plus those the configuration names for later reading
/// (certificates, keys, CA bundles), each once. The access log and `state_file`, which tokengate
/// writes itself, are not among them.
pub(super) fn named_files(config: &Config, mut files: Vec<PathBuf>) -> Vec<PathBuf> {
    if let Some(tls) = &config.tls {
        files.extend([tls.cert_file.clone(), tls.key_file.clone()]);
        files.extend(tls.client_ca_file.clone());
    }
    for r in &config.routes {
        files.extend(r.ca_file.iter().chain(&r.client_cert_file).chain(&r.client_key_file).cloned());
    }
    files.extend(config.providers.values().filter_map(|p| p.common().ca_file.clone()));
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    files
}
