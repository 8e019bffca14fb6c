//! Reloading the configuration: SIGHUP, `POST /reload` and changed files ([`watch`]) all end in
//! [`Control::reload_file`]. A file that does not load keeps the running configuration.

pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use crate::admin::readiness::Readiness;
use crate::config::Config;
use crate::proxy::{Proxy, Runtime};
use crate::token::{Providers, TokenSource};

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
        let result = match self.path.as_ref() {
            None => Err("this instance was not started from a file".to_owned()),
            Some(path) => match crate::config::load(path) {
                Ok(config) => self.reload(config).await,
                Err(e) => Err(e.to_string()),
            },
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.proxy.metrics.config_reloads.with_label_values(&[label]).inc();
        result
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
        let server_tls = match (&self.tls, &config.tls) {
            (Some(_), Some(tls)) => Some(crate::tls::inbound(tls).map_err(|e| e.to_string())?),
            _ => None,
        };
        let mut providers = Providers::new();
        let mut fresh = Vec::new();
        let shared = crate::token::shared_cache(&config)?;
        for (name, cfg) in &config.providers {
            // Keep a running source with the same settings (under this name or another one).
            let running = old
                .providers
                .get(name)
                .filter(|p| p.config() == cfg)
                .or_else(|| old.providers.values().find(|p| p.config() == cfg))
                .or_else(|| providers.values().find(|p| p.config() == cfg));
            match running {
                Some(p) => {
                    providers.insert(name.clone(), p.clone());
                }
                None => {
                    let p = TokenSource::new(name, cfg, self.proxy.metrics.clone(), shared.clone())?;
                    fresh.push(p.clone());
                    providers.insert(name.clone(), p);
                }
            }
        }
        let runtime = Runtime::build(&config, providers, &self.proxy.metrics)?;
        let mut prefetch = tokio::task::JoinSet::new();
        for p in &fresh {
            let p = p.clone();
            prefetch.spawn(async move {
                if let Err(e) = p.get().await {
                    tracing::warn!(provider = p.name(), error = %e, "new provider has no token yet; its routes answer 503 until it has");
                }
                p.start();
            });
        }
        while prefetch.join_next().await.is_some() {}
        let routes = runtime.table.len();
        self.proxy.runtime.store(Arc::new(runtime));
        if let (Some(slot), Some(server_tls)) = (&self.tls, server_tls) {
            slot.store(Arc::new(server_tls));
        }
        if let Ok(mut current) = self.config.lock() {
            *current = config;
        }
        self.loaded_at.store(unix_now(), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(routes, new_providers = fresh.len(), "configuration reloaded");
        Ok(())
    }
}
