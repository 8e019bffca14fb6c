//! Reloading the configuration: SIGHUP, `POST /reload` and changed files ([`watch`]) all end in
//! [`Control::reload_file`]. A file that does not load keeps the running configuration.

mod warming;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::proxy::{Proxy, Runtime};
use crate::readiness::Readiness;

/// What reloads and the admin listener need: the state to swap and where the configuration
/// came from.
pub struct Control {
    proxy: Arc<Proxy>,
    config: std::sync::Mutex<Config>,
    path: Option<PathBuf>,
    // Reloads run one at a time.
    reloading: tokio::sync::Mutex<()>,
    /// What `/readyz` answers.
    pub readiness: Arc<Readiness>,
    // The TLS listener's certificate and client CA, swapped on reload.
    tls: Option<crate::tls::ServerTls>,
    // When the configuration in force was loaded (Unix seconds).
    loaded_at: std::sync::atomic::AtomicU64,
    // Providers of the configuration in force still getting their first token, with the error.
    warming: warming::Warming,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Control {
    /// The control for a running instance started from `config` (read from `path`, if any).
    pub fn new(
        proxy: Arc<Proxy>,
        config: Config,
        path: Option<PathBuf>,
        readiness: Arc<Readiness>,
        tls: Option<crate::tls::ServerTls>,
    ) -> Self {
        Control {
            proxy,
            config: std::sync::Mutex::new(config),
            path,
            reloading: tokio::sync::Mutex::new(()),
            readiness,
            tls,
            loaded_at: std::sync::atomic::AtomicU64::new(unix_now()),
            warming: warming::Warming::default(),
        }
    }

    /// The configuration file (if any), when the configuration in force was loaded (Unix
    /// seconds) and a short digest of the file it was read from, for the status page.
    pub fn loaded(&self) -> (Option<String>, u64, Option<String>) {
        let at = self.loaded_at.load(std::sync::atomic::Ordering::Relaxed);
        let digest = self.config.lock().ok().and_then(|c| c.digest.clone());
        (self.path.as_ref().map(|p| p.display().to_string()), at, digest)
    }

    /// Reads the configuration file again and swaps it in; on error the running one stays.
    /// Every outcome is counted in `tokengate_config_reloads_total{result}`.
    pub async fn reload_file(&self) -> Result<(), String> {
        let result = match self.path.clone() {
            None => Err("this instance was not started from a file".to_owned()),
            // Off the control runtime, whose one thread also answers /healthz and refreshes
            // tokens: reading and parsing may take a while.
            Some(path) => match tokio::task::spawn_blocking(move || crate::config::load(&path)).await {
                Ok(Ok(config)) => self.reload(config).await,
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("reading the configuration failed: {e}")),
            },
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.proxy.metrics.config_reloads.with_label_values(&[label]).inc();
        result
    }

    /// Changed or new providers of the last reload that have no token yet (name and error);
    /// their routes keep the provider they had before until they have one.
    pub fn warming(&self) -> std::collections::BTreeMap<String, String> {
        self.warming.snapshot()
    }

    /// The configuration file, if this instance was started from one.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// A copy of the configuration in force.
    pub fn config(&self) -> Option<Config> {
        self.config.lock().ok().map(|c| c.clone())
    }

    /// The admin listener's settings in force.
    pub fn admin(&self) -> crate::config::Admin {
        self.config.lock().map(|c| c.admin.clone()).unwrap_or_default()
    }

    /// The shared proxy state.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Swaps in a new configuration: providers whose settings did not change keep their cached
    /// tokens, new ones fetch a token before any route uses them, and the TLS listener's
    /// certificate is swapped (connections already open keep theirs). The listener addresses and
    /// connection limits are fixed at start; changes to them are logged and ignored.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.proxy.runtime.load_full();
        if let Ok(current) = self.config.lock() {
            if current.listen != config.listen || current.admin.listen != config.admin.listen {
                tracing::warn!("listen addresses cannot change on reload; restart to apply them");
            }
            if current.tracing != config.tracing {
                tracing::warn!("tracing settings cannot change on reload; restart to apply them");
            }
            if current.access_log.to != config.access_log.to {
                tracing::warn!("the access log destination cannot change on reload; restart to apply it");
            }
            if current.tls.as_ref().map(|t| t.listen) != config.tls.as_ref().map(|t| t.listen) {
                tracing::warn!(
                    "the TLS listener cannot be added, removed or moved on reload; restart to apply it"
                );
            }
        }
        // Built before anything is swapped, so a bad certificate fails the whole reload.
        let built = crate::system::build(&config, &self.proxy.metrics, &old.providers)?;
        let mut prefetch = tokio::task::JoinSet::new();
        for p in &built.fresh {
            let p = p.clone();
            prefetch.spawn(async move {
                let got = if p.per_subject() { Ok(()) } else { p.get().await.map(|_| ()) };
                p.start();
                got.err().map(|e| (p, e.reason))
            });
        }
        let cold: Vec<_> = prefetch.join_all().await.into_iter().flatten().collect();
        // Envoy's cluster warming: a changed or new provider without a token does not take over
        // routes that were being served; they keep their previous provider until it has one.
        let plan = warming::plan(&config, &built.runtime.providers, &cold, &old);
        let (installed, full) = if plan.cold.is_empty() {
            (Arc::new(built.runtime), None)
        } else {
            (
                Arc::new(Runtime::build(&plan.config, plan.providers, &self.proxy.metrics)?),
                Some(built.runtime),
            )
        };
        let routes = installed.table.len();
        self.proxy.runtime.store(installed.clone());
        match full {
            Some(full) => self.warming.start(&self.proxy, installed, full, &plan.cold),
            None => self.warming.clear(),
        }
        if let (Some(slot), Some(server_tls)) = (&self.tls, built.server_tls) {
            slot.store(Arc::new(server_tls));
        }
        if let Ok(mut current) = self.config.lock() {
            *current = config;
        }
        self.loaded_at.store(unix_now(), std::sync::atomic::Ordering::Relaxed);
        if plan.cold.is_empty() {
            tracing::info!(routes, new_providers = built.fresh.len(), "configuration reloaded");
            return Ok(());
        }
        let message = warming::describe(&plan.cold);
        tracing::error!("configuration reloaded, except: {message}");
        Err(format!("applied, except: {message}"))
    }
}
