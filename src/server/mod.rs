//! Listeners, worker threads, graceful shutdown and reload. [`connection`] follows one
//! connection from accept to close.

mod connection;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use connection::{Handler, Listener, Slots, serve};

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

/// Where connections to the proxy listeners are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// On the runtime that calls [`start_with`] (tests, embedding).
    Caller,
    /// On this many threads, each with its own event loop and its own listening socket
    /// (`SO_REUSEPORT`), as nginx runs worker processes: a connection, its requests and its
    /// upstream connections stay on one thread, with no task stealing or cross-thread wake-ups.
    Threads(std::num::NonZeroUsize),
}

/// A running tokengate: both listeners, the token sources and their background tasks.
pub struct Running {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    /// Where the TLS listener listens, if configured.
    pub tls_addr: Option<SocketAddr>,
    /// Where the forward-proxy listener listens, if configured.
    pub forward_addr: Option<SocketAddr>,
    /// Shared state.
    pub proxy: Arc<Proxy>,
    control: Arc<Control>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    // Worker threads report here when their listeners have drained.
    threads: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// What reloads need: the state to swap and where the configuration came from.
pub struct Control {
    proxy: Arc<Proxy>,
    config: std::sync::Mutex<Config>,
    path: Option<std::path::PathBuf>,
    // Reloads run one at a time.
    reloading: tokio::sync::Mutex<()>,
}

/// Binds the listeners, starts fetching tokens and serves until [`Running::shutdown`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, None, Workers::Caller).await
}

/// As [`start`]; `path` is the file that SIGHUP and `POST /reload` read again, `workers` says
/// where the proxy listeners' connections are served. The admin listener and token refreshes
/// run on the caller's runtime.
pub async fn start_with(
    config: Config,
    path: Option<std::path::PathBuf>,
    workers: Workers,
) -> Result<Running, StartError> {
    let metrics = Metrics::new();
    let providers = token::build(&config, &metrics).map_err(StartError::Setup)?;
    for p in providers.values() {
        p.start();
    }
    let runtime = Runtime::build(&config, providers, &metrics).map_err(StartError::Setup)?;
    let access_log = crate::access_log::AccessLog::start(&config.access_log, &metrics).map_err(|e| {
        StartError::Setup(match &config.access_log.to {
            crate::config::AccessLogTo::File(p) => format!("access_log: cannot open {}: {e}", p.display()),
            _ => format!("access_log: {e}"),
        })
    })?;
    let proxy = Arc::new(Proxy::new(runtime, metrics, access_log));

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
    };
    let threads = match workers {
        Workers::Caller => 1,
        Workers::Threads(n) => n.get(),
    };
    let proxy_listener = bind_shared(config.listen, threads)?;
    let admin_listener = bind(config.admin.listen).await?;
    let proxy_addr = proxy_listener.addr;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr: config.admin.listen, source })?;
    let proxy_guarded = !config.access.allow.is_empty() || config.access.api_keys.is_some();
    if !proxy_addr.ip().is_loopback() && !proxy_guarded {
        tracing::warn!(
            %proxy_addr,
            "!!! the proxy listens on a non-loopback address with no access control: anyone who can reach it \
             acts with tokengate's credentials; set access.allow and/or access.api_keys"
        );
    }
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(%admin_addr, "the admin listener (metrics, POST /reload) is reachable from other hosts");
    }

    let (shutdown, rx) = watch::channel(false);
    let builder = connection_builder(&config.limits);
    let control = Arc::new(Control {
        proxy: proxy.clone(),
        config: std::sync::Mutex::new(config.clone()),
        path,
        reloading: tokio::sync::Mutex::new(()),
    });
    let proxy_settings = Listener {
        grace: config.limits.shutdown_grace,
        idle_timeout: config.limits.idle_timeout,
        send_timeout: config.limits.send_timeout,
        first_request_timeout: first_request_timeout(&config.limits),
        tls: None,
        closed: proxy.metrics.connections_closed.clone(),
        name: "proxy",
    };
    let max_connections = config.limits.max_connections;
    let builder = Arc::new(builder);
    let p = proxy.clone();
    let proxy_service = move |conn: crate::proxy::Conn| {
        let p = p.clone();
        service_fn(move |req| {
            let p = p.clone();
            async move { Ok::<_, Infallible>(p.handle(req, conn).await) }
        })
    };
    let mut tasks = Vec::new();
    // Serving loops by worker.
    let mut loops: Vec<Vec<ServeFuture>> = (0..threads).map(|_| Vec::new()).collect();
    let mut add = |per_worker: Vec<ServeFuture>| {
        for (worker, serving) in per_worker.into_iter().enumerate() {
            loops[worker].push(serving);
        }
    };
    let mut tls_addr = None;
    if let Some(tls) = &config.tls {
        let required =
            tls.client_ca_file.is_some() && tls.client_cert != Some(crate::config::ClientCertMode::Optional);
        let server_config =
            crate::tls::server_config(&tls.cert_file, &tls.key_file, tls.client_ca_file.as_deref(), required)
                .map_err(|e| StartError::Setup(e.to_string()))?;
        let listener = bind_shared(tls.listen, threads)?;
        tls_addr = Some(listener.addr);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let settings = Listener { tls: Some(acceptor), name: "tls", ..proxy_settings.clone() };
        add(listener.serve(builder.clone(), rx.clone(), settings, max_connections, proxy_service.clone()));
    }
    let mut forward_addr = None;
    if let Some(fwd) = &config.forward_proxy {
        let listener = bind_shared(fwd.listen, threads)?;
        forward_addr = Some(listener.addr);
        let plain = proxy_service.clone();
        let service = move |conn: crate::proxy::Conn| plain(crate::proxy::Conn { forward: true, ..conn });
        let settings = Listener { name: "forward_proxy", ..proxy_settings.clone() };
        add(listener.serve(builder.clone(), rx.clone(), settings, max_connections, service));
    }
    add(proxy_listener.serve(builder.clone(), rx.clone(), proxy_settings, max_connections, proxy_service));
    let mut worker_done = Vec::new();
    for (index, serving) in loops.into_iter().enumerate() {
        match workers {
            Workers::Caller => tasks.extend(serving.into_iter().map(tokio::spawn)),
            Workers::Threads(_) => worker_done.push(spawn_worker(index, serving)?),
        }
    }
    let admin_settings = Listener {
        grace: Duration::from_secs(1),
        idle_timeout: config.limits.idle_timeout,
        send_timeout: config.limits.send_timeout,
        first_request_timeout: first_request_timeout(&config.limits),
        tls: None,
        closed: proxy.metrics.connections_closed.clone(),
        name: "admin",
    };
    let c = control.clone();
    let admin_slots = Slots::new(ADMIN_CONNECTIONS);
    tasks.push(tokio::spawn(serve(admin_listener, builder, rx, admin_settings, admin_slots, move |conn| {
        let c = c.clone();
        service_fn(move |req| {
            let c = c.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(&c, req, conn).await) }
        })
    })));
    tracing::info!(%proxy_addr, %admin_addr, tls_addr = ?tls_addr, "tokengate is listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        tls_addr,
        forward_addr,
        proxy,
        control,
        shutdown,
        tasks,
        threads: worker_done,
    })
}

/// A connection that has sent no request is idle too: it must send its first request head
/// within the header timeout, and within the idle timeout if that is shorter.
fn first_request_timeout(limits: &Limits) -> Duration {
    limits.header_read_timeout.min(limits.idle_timeout)
}

/// Connections the admin listener serves at once. Probes and scrapers open a few; when all are
/// taken, the oldest idle one is closed for a newcomer, so a flood of silent sockets cannot make
/// `/healthz` fail. Many slots cost nothing and let eviction keep up with a fast flood.
const ADMIN_CONNECTIONS: usize = 256;

/// One listener's serving loop on one worker.
type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A listening address with one socket per worker.
struct SharedListener {
    addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// Binds `count` sockets to `addr` (for port 0, the port the first one got). More than one uses
/// `SO_REUSEPORT`, so the kernel spreads new connections over the workers.
fn bind_shared(addr: SocketAddr, count: usize) -> Result<SharedListener, StartError> {
    let failed = |source| StartError::Bind { addr, source };
    let one = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket =
            if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if count > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        // Back to a std socket: the thread that serves it registers it with its own event loop.
        socket.listen(1024)?.into_std()
    };
    let first = one(addr).map_err(failed)?;
    let actual = first.local_addr().map_err(failed)?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(one(actual).map_err(failed)?);
    }
    Ok(SharedListener { addr: actual, sockets })
}

impl SharedListener {
    /// A serving loop per socket (per worker), sharing one connection limit.
    fn serve<F, S>(
        self,
        builder: Arc<auto::Builder<TokioExecutor>>,
        shutdown: watch::Receiver<bool>,
        settings: Listener,
        max_connections: usize,
        make_service: F,
    ) -> Vec<ServeFuture>
    where
        F: Fn(crate::proxy::Conn) -> S + Clone + Send + Sync + 'static,
        S: Handler,
        S::Future: Send + 'static,
    {
        let slots = Slots::new(max_connections);
        self.sockets
            .into_iter()
            .map(|socket| {
                let (builder, shutdown, settings, slots, make_service) = (
                    builder.clone(),
                    shutdown.clone(),
                    settings.clone(),
                    slots.clone(),
                    make_service.clone(),
                );
                Box::pin(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => {
                            serve(listener, builder, shutdown, settings, slots, make_service).await
                        }
                        Err(e) => tracing::error!(error = %e, "cannot serve a listening socket"),
                    }
                }) as ServeFuture
            })
            .collect()
    }
}

/// Starts worker thread `index` with its own single-threaded runtime, serving `loops` until
/// they have drained; the receiver hears when that is.
fn spawn_worker(
    index: usize,
    loops: Vec<ServeFuture>,
) -> Result<tokio::sync::oneshot::Receiver<()>, StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Setup(format!("cannot start worker {index}: {e}")))?;
    let (done, report) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("tokengate-worker-{index}"))
        .spawn(move || {
            crate::proxy::h1::set_worker(index);
            runtime.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for serving in loops {
                    set.spawn(serving);
                }
                while set.join_next().await.is_some() {}
            });
            let _ = done.send(());
        })
        .map_err(|e| StartError::Setup(format!("cannot start worker {index}: {e}")))?;
    Ok(report)
}

fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's minimum buffer is 8 KiB; the limit is also what bounds header size.
        .max_buf_size(usize::try_from(limits.max_header_size).unwrap_or(usize::MAX).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for worker in self.threads {
            let _ = worker.await;
        }
        self.proxy.access_log().flush();
    }

    /// Reopens the access-log file (SIGUSR1, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        self.proxy.access_log().reopen();
    }

    /// Swaps in a new configuration (see [`Control::reload`]).
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        self.control.reload(config).await
    }

    /// Reads the configuration file again and swaps it in; on error the running one stays.
    pub async fn reload_file(&self) -> Result<(), String> {
        self.control.reload_file().await
    }
}

impl Control {
    /// Reads the configuration file again and swaps it in; on error the running one stays.
    pub async fn reload_file(&self) -> Result<(), String> {
        let path = self.path.as_ref().ok_or("this instance was not started from a file")?;
        let config = crate::config::load(path).map_err(|e| e.to_string())?;
        self.reload(config).await
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
    /// tokens, new ones fetch a token before any route uses them. The listener addresses and
    /// connection limits are fixed at start; changes to them are logged and ignored.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.proxy.runtime.load_full();
        if let Ok(current) = self.config.lock()
            && (current.listen != config.listen || current.admin.listen != config.admin.listen)
        {
            tracing::warn!("listen addresses cannot change on reload; restart to apply them");
        }
        if let Ok(current) = self.config.lock()
            && current.access_log.to != config.access_log.to
        {
            tracing::warn!("the access log destination cannot change on reload; restart to apply it");
        }
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
        if let Ok(mut current) = self.config.lock() {
            *current = config;
        }
        tracing::info!(routes, new_providers = fresh.len(), "configuration reloaded");
        Ok(())
    }
}
