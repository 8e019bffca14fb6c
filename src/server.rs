//! Listeners, connection handling, graceful shutdown and reload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Runtime};
use crate::token::{self, Providers, TokenSource};

/// Why tokengate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration cannot be turned into a running setup (bad CA file, say).
    #[error("{0}")]
    Setup(String),
}

/// A running tokengate: both listeners, the token sources and their background tasks.
pub struct Running {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    /// Shared state.
    pub proxy: Arc<Proxy>,
    config: std::sync::Mutex<Config>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds the listeners, starts fetching tokens and serves until [`Running::shutdown`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_metrics(config, Metrics::new()).await
}

/// As [`start`], with a given metrics registry.
pub async fn start_with_metrics(config: Config, metrics: Metrics) -> Result<Running, StartError> {
    let providers = token::build(&config, &metrics).map_err(StartError::Setup)?;
    for p in providers.values() {
        p.start();
    }
    let runtime = Runtime::build(&config, providers).map_err(StartError::Setup)?;
    let proxy = Arc::new(Proxy {
        runtime: ArcSwap::from_pointee(runtime),
        metrics,
    });

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let proxy_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin.listen).await?;
    let proxy_addr = proxy_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    for (what, addr) in [("proxy", proxy_addr), ("admin", admin_addr)] {
        if !addr.ip().is_loopback() {
            tracing::warn!(listener = what, %addr, "listening on a non-loopback address: anyone who can reach it acts with tokengate's credentials");
        }
    }

    let (shutdown, rx) = watch::channel(false);
    let builder = connection_builder(&config.limits);
    let p = proxy.clone();
    let proxy_task = tokio::spawn(serve(
        proxy_listener,
        builder.clone(),
        rx.clone(),
        config.limits.shutdown_grace,
        move |remote| {
            let p = p.clone();
            service_fn(move |req| {
                let p = p.clone();
                async move { Ok::<_, Infallible>(p.handle(req, remote).await) }
            })
        },
    ));
    let p = proxy.clone();
    let admin_task = tokio::spawn(serve(
        admin_listener,
        builder,
        rx,
        Duration::from_secs(1),
        move |_| {
            let p = p.clone();
            service_fn(move |req| {
                let p = p.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(&p, &req)) }
            })
        },
    ));
    tracing::info!(%proxy_addr, %admin_addr, "tokengate is listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        proxy,
        config: std::sync::Mutex::new(config),
        shutdown,
        tasks: vec![proxy_task, admin_task],
    })
}

fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's minimum buffer is 8 KiB; the limit is also what bounds header size.
        .max_buf_size(
            usize::try_from(limits.max_header_size)
                .unwrap_or(usize::MAX)
                .max(8192),
        );
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

async fn serve<F, S>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    make_service: F,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::proxy::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, usually: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(stream), make_service(remote)).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
    }
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Swaps in a new configuration: providers whose settings did not change keep their cached
    /// tokens, new ones fetch a token before any route uses them. The listener addresses and
    /// connection limits are fixed at start; changes to them are logged and ignored.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let old = self.proxy.runtime.load_full();
        if let Ok(current) = self.config.lock() {
            if current.listen != config.listen || current.admin.listen != config.admin.listen {
                tracing::warn!("listen addresses cannot change on reload; restart to apply them");
            }
        }
        let mut providers = Providers::new();
        let mut fresh = Vec::new();
        for (name, cfg) in &config.providers {
            match old.providers.get(name) {
                Some(p) if p.config() == cfg => {
                    providers.insert(name.clone(), p.clone());
                }
                _ => {
                    let p = TokenSource::new(name, cfg, self.proxy.metrics.clone())?;
                    fresh.push(p.clone());
                    providers.insert(name.clone(), p);
                }
            }
        }
        let runtime = Runtime::build(&config, providers)?;
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
        self.proxy.runtime.store(Arc::new(runtime));
        if let Ok(mut current) = self.config.lock() {
            *current = config;
        }
        tracing::info!(
            routes = self.proxy.runtime.load().table.len(),
            new_providers = fresh.len(),
            "configuration reloaded"
        );
        Ok(())
    }
}
