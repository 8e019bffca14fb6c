//! Warming changed providers, as Envoy warms clusters: a reload that changes a provider (or
//! points a route at another one) swaps it in only once it has a token. Until then the routes
//! that were being served keep the provider they had, the reload is reported as failed (log,
//! `/readyz`, `tokengate_config_reloads_total`), and a background task switches them over the
//! moment the new provider gets its token. A dead IdP or a typo in a URL never takes a working
//! route down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::{Config, Text};
use crate::proxy::{Proxy, Runtime};
use crate::token::{Providers, TokenSource};

/// How often the warming task looks whether the new providers have their tokens.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// A provider of the new configuration that has no token yet.
pub(super) struct Cold {
    /// Its name.
    pub name: String,
    /// Why its first fetch failed.
    pub error: String,
    /// Routes (labels) that keep their previous provider meanwhile.
    pub kept: Vec<String>,
}

/// What to serve while the cold providers warm.
pub(super) struct Plan {
    /// The new configuration, with the routes of cold providers on their previous ones.
    pub config: Config,
    /// The providers that configuration names.
    pub providers: Providers,
    /// The providers still without a token.
    pub cold: Vec<Cold>,
}

/// Which routes keep their previous provider: those of a provider in `cold` that existed (same
/// prefix) in `old`. A route new in this reload has nothing to keep and waits for its provider.
pub(super) fn plan(
    config: &Config,
    providers: &Providers,
    cold: &[(Arc<TokenSource>, String)],
    old: &Runtime,
) -> Plan {
    let mut serving_config = config.clone();
    let mut serving = providers.clone();
    let mut out = Vec::new();
    for (source, error) in cold {
        let names = providers.iter().filter(|(_, p)| Arc::ptr_eq(p, source)).map(|(n, _)| n.clone());
        for name in names.collect::<Vec<_>>() {
            let mut kept = Vec::new();
            for route in serving_config.routes.iter_mut().filter(|r| r.provider.0 == name) {
                let Some(before) = old.routes.iter().find(|r| r.prefix == route.prefix.as_str()) else {
                    continue;
                };
                let previous = before.provider.clone();
                // Under its own name, unless that name now means another provider.
                let own = previous.name().to_owned();
                let key = match serving.get(&own) {
                    Some(p) if !Arc::ptr_eq(p, &previous) && !Arc::ptr_eq(p, source) => {
                        format!("{own} (previous)")
                    }
                    _ => own,
                };
                serving.insert(key.clone(), previous);
                route.provider = Text(key);
                kept.push(route.label().to_owned());
            }
            out.push(Cold { name, error: error.clone(), kept });
        }
    }
    // A cold provider no route uses any more is not served (it is reported as warming).
    serving.retain(|name, p| {
        !cold.iter().any(|(c, _)| Arc::ptr_eq(c, p))
            || serving_config.routes.iter().any(|r| r.provider.0 == *name)
    });
    Plan { config: serving_config, providers: serving, cold: out }
}

/// The cold providers in words, for the log and the reload's error.
pub(super) fn describe(cold: &[Cold]) -> String {
    let parts: Vec<String> = cold
        .iter()
        .map(|c| {
            let kept = if c.kept.is_empty() {
                "its new routes answer 503 token_unavailable until it has one".to_owned()
            } else {
                format!("routes {} keep their previous provider until it has one", c.kept.join(", "))
            };
            format!("provider {} has no token ({}); {kept}", c.name, c.error)
        })
        .collect();
    parts.join("; ")
}

/// The providers warming now, and the task that switches their routes over.
#[derive(Default)]
pub(super) struct Warming {
    cold: Arc<Mutex<BTreeMap<String, String>>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Warming {
    /// Provider names and their errors.
    pub(super) fn snapshot(&self) -> BTreeMap<String, String> {
        self.cold.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Nothing is warming (a later reload replaced what was).
    pub(super) fn clear(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
        self.cold.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Switches from `installed` to `full` once every provider of `full` named in `cold` has a
    /// token, unless another configuration was installed meanwhile.
    pub(super) fn start(&self, proxy: &Arc<Proxy>, installed: Arc<Runtime>, full: Runtime, cold: &[Cold]) {
        self.clear();
        let names: BTreeMap<String, String> =
            cold.iter().map(|c| (c.name.clone(), c.error.clone())).collect();
        let sources: Vec<Arc<TokenSource>> =
            names.keys().filter_map(|n| full.providers.get(n).cloned()).collect();
        *self.cold.lock().unwrap_or_else(PoisonError::into_inner) = names;
        let (proxy, state) = (proxy.clone(), self.cold.clone());
        let task = tokio::spawn(async move {
            let full = Arc::new(full);
            loop {
                tokio::time::sleep(LOOK_EVERY).await;
                if !Arc::ptr_eq(&proxy.runtime.load(), &installed) {
                    return;
                }
                if sources.iter().all(|s| s.ready()) {
                    let before = proxy.runtime.compare_and_swap(&installed, full);
                    if Arc::ptr_eq(&before, &installed) {
                        let names: Vec<String> = sources.iter().map(|s| s.name().to_owned()).collect();
                        tracing::info!(providers = ?names, "the new providers have their tokens: their routes switched to them");
                        state.lock().unwrap_or_else(PoisonError::into_inner).clear();
                    }
                    return;
                }
            }
        });
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }
}
