//! Starting and stopping: listeners and workers ([`listen`]), one connection's life
//! ([`connection`]), the start-up warm-up and the shutdown sequence. Reloads live in
//! [`crate::reload`].

mod activity;
mod connection;
mod listen;
mod parse_error;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use connection::{Listener, Slots, serve};
use listen::{ServeFuture, bind_shared, connection_builder, spawn_worker};

use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::readiness::Readiness;
use crate::reload::Control;
use crate::token::Providers;

/// Why tokengate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}{}", in_use_hint(source))]
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
    // Background tasks stopped (not drained) at shutdown: warm-up, file watching.
    helpers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    // Worker threads report here when their listeners have drained.
    threads: Vec<tokio::sync::oneshot::Receiver<()>>,
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
    let system = crate::system::build(&config, &metrics, &Providers::new()).map_err(StartError::Setup)?;
    for p in &system.fresh {
        p.start();
    }
    let access_log = crate::access_log::AccessLog::start(&config.access_log, &metrics).map_err(|e| {
        StartError::Setup(match &config.access_log.to {
            crate::config::AccessLogTo::File(p) => format!("access_log: cannot open {}: {e}", p.display()),
            _ => format!("access_log: {e}"),
        })
    })?;
    let traces = match &config.tracing {
        Some(t) => {
            Some(Arc::new(crate::trace::Traces::start(t).map_err(|e| StartError::Setup(e.to_string()))?))
        }
        None => None,
    };
    let proxy = Arc::new(Proxy::new(system.runtime, metrics, access_log).with_traces(traces));

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
    for warning in warnings(&config) {
        tracing::warn!("{warning}");
    }

    let (shutdown, rx) = watch::channel(false);
    let builder = connection_builder(&config.limits);
    let server_tls = system.server_tls.map(|tls| Arc::new(arc_swap::ArcSwap::from_pointee(tls)));
    let readiness = Arc::new(Readiness::default());
    let control =
        Arc::new(Control::new(proxy.clone(), config.clone(), path, readiness.clone(), server_tls.clone()));
    let proxy_settings = Listener {
        grace: config.limits.shutdown_grace,
        idle_timeout: config.limits.idle_timeout,
        send_timeout: config.limits.send_timeout,
        first_request_timeout: first_request_timeout(&config.limits),
        tls: None,
        closed: proxy.metrics.connections_closed.clone(),
        name: "proxy",
        access_log: Some(proxy.access_log().clone()),
    };
    let max_connections = config.limits.max_connections;
    let builder = Arc::new(builder);
    let p = proxy.clone();
    let proxy_service = move |conn: crate::proxy::Conn, tunnels: &crate::proxy::websocket::ConnTunnels| {
        let (p, tunnels) = (p.clone(), tunnels.clone());
        service_fn(move |req| {
            let (p, tunnels, conn) = (p.clone(), tunnels.clone(), conn.clone());
            async move { Ok::<_, Infallible>(p.handle(req, conn, &tunnels).await) }
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
    if let (Some(tls), Some(server_tls)) = (&config.tls, server_tls) {
        let listener = bind_shared(tls.listen, threads)?;
        tls_addr = Some(listener.addr);
        let settings = Listener { tls: Some(server_tls), name: "tls", ..proxy_settings.clone() };
        add(listener.serve(builder.clone(), rx.clone(), settings, max_connections, proxy_service.clone()));
    }
    let mut forward_addr = None;
    if let Some(fwd) = &config.forward_proxy {
        let listener = bind_shared(fwd.listen, threads)?;
        forward_addr = Some(listener.addr);
        let plain = proxy_service.clone();
        let service = move |conn: crate::proxy::Conn, tunnels: &crate::proxy::websocket::ConnTunnels| {
            plain(crate::proxy::Conn { forward: true, ..conn }, tunnels)
        };
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
        access_log: None,
    };
    let c = control.clone();
    let admin_slots = Slots::new(ADMIN_CONNECTIONS);
    tasks.push(tokio::spawn(serve(
        admin_listener,
        builder,
        rx,
        admin_settings,
        admin_slots,
        move |conn, _| {
            let c = c.clone();
            service_fn(move |req| {
                let (c, conn) = (c.clone(), conn.clone());
                async move { Ok::<_, Infallible>(crate::admin::handle(&c, req, conn).await) }
            })
        },
    )));
    tracing::info!(%proxy_addr, %admin_addr, tls_addr = ?tls_addr, "tokengate is listening");
    tracing::info!(
        hosts = %served_hosts(&config.access.hosts),
        "Host values served (access.hosts adds names; a web page on any other name is refused)"
    );
    let mut helpers = vec![tokio::spawn(warm_up(proxy.clone(), readiness, config.limits.warmup_timeout))];
    helpers.extend(crate::reload::watch::spawn(control.clone()));
    Ok(Running {
        proxy_addr,
        admin_addr,
        tls_addr,
        forward_addr,
        proxy,
        control,
        shutdown,
        helpers,
        tasks,
        threads: worker_done,
    })
}

fn in_use_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        " (another process, perhaps another tokengate, is listening there; stop it or choose another address)"
    } else {
        ""
    }
}

/// The `Host` values the proxy listeners serve, in words.
fn served_hosts(names: &[crate::config::Text]) -> String {
    if names.iter().any(|n| n.0 == "*") {
        return "any (access.hosts has *)".to_owned();
    }
    let mut out = String::from("IP literals, localhost");
    for n in names {
        out.push_str(", ");
        out.push_str(&n.0);
    }
    out
}

/// What `run` warns about in a configuration that it still serves (`check` prints the same).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let guarded = !config.access.allow.is_empty() || config.access.api_keys.is_some();
    if !config.listen.ip().is_loopback() && !guarded {
        out.push(format!(
            "!!! the proxy listens on {} (not loopback) with no access control: anyone who can reach it \
             acts with tokengate's credentials; set access.allow and/or access.api_keys",
            config.listen
        ));
    }
    if !config.admin.listen.ip().is_loopback() && config.admin.allow.is_empty() {
        out.push(format!(
            "the admin listener on {} (metrics, /tokens) is reachable from other hosts; set admin.allow",
            config.admin.listen
        ));
    }
    out
}

/// Builds everything [`start_with`] builds except the listeners (token sources, upstream clients
/// and their CA files, the TLS listener's certificate and key), so `check` refuses what `run`
/// would refuse.
pub fn prepare(config: &Config) -> Result<(), StartError> {
    crate::system::build(config, &Metrics::new(), &Providers::new()).map_err(StartError::Setup)?;
    Ok(())
}

/// Ready once every provider has a token, or when `timeout` has passed, whichever is first.
async fn warm_up(proxy: Arc<Proxy>, readiness: Arc<Readiness>, timeout: Duration) {
    let providers = proxy.runtime.load_full().providers.clone();
    let all = async {
        for p in providers.values() {
            p.wait_usable().await;
        }
    };
    if tokio::time::timeout(timeout, all).await.is_err() {
        let missing: Vec<&str> =
            providers.iter().filter(|(_, p)| !p.ready()).map(|(n, _)| n.as_str()).collect();
        tracing::warn!(
            ?missing,
            "warm-up timed out: ready without a token for these providers; their routes answer 503 token_unavailable until they have one"
        );
    }
    readiness.warmed_up();
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

impl Running {
    /// Shuts down: `/readyz` answers 503 at once, the listeners keep accepting for
    /// `limits.shutdown_delay` (so load balancers stop sending first), then stop accepting, and
    /// in-flight requests finish within `limits.shutdown_grace`.
    pub async fn shutdown(self) {
        self.control.readiness.shutting_down();
        let delay = self.control.config().map_or(Duration::ZERO, |c| c.limits.shutdown_delay);
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "unready; still accepting during shutdown_delay"
            );
            tokio::time::sleep(delay).await;
        }
        for h in &self.helpers {
            h.abort();
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for worker in self.threads {
            let _ = worker.await;
        }
        self.proxy.access_log().flush();
        if let Some(traces) = self.proxy.traces().cloned() {
            // Sends the queued spans: a blocking call, made off the async workers.
            let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        }
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

    /// What `/readyz` answers.
    pub fn readiness(&self) -> &Readiness {
        &self.control.readiness
    }
}
