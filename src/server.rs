//! Listeners, connection handling, graceful shutdown and reload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
    let proxy = Arc::new(Proxy::new(runtime, metrics));

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
        handshake_timeout: config.limits.header_read_timeout,
        max_connections: config.limits.max_connections,
        tls: None,
    };
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
        let settings = Listener { tls: Some(acceptor), ..proxy_settings.clone() };
        add(listener.serve(builder.clone(), rx.clone(), settings, proxy_service.clone()));
    }
    let mut forward_addr = None;
    if let Some(fwd) = &config.forward_proxy {
        let listener = bind_shared(fwd.listen, threads)?;
        forward_addr = Some(listener.addr);
        let plain = proxy_service.clone();
        let service = move |conn: crate::proxy::Conn| plain(crate::proxy::Conn { forward: true, ..conn });
        add(listener.serve(builder.clone(), rx.clone(), proxy_settings.clone(), service));
    }
    add(proxy_listener.serve(builder.clone(), rx.clone(), proxy_settings, proxy_service));
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
        handshake_timeout: config.limits.header_read_timeout,
        max_connections: 64,
        tls: None,
    };
    let c = control.clone();
    let admin_slots = Arc::new(tokio::sync::Semaphore::new(admin_settings.max_connections));
    tasks.push(tokio::spawn(serve(admin_listener, builder, rx, admin_settings, admin_slots, move |_| {
        let c = c.clone();
        service_fn(move |req| {
            let c = c.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(&c, req).await) }
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
        make_service: F,
    ) -> Vec<ServeFuture>
    where
        F: Fn(crate::proxy::Conn) -> S + Clone + Send + Sync + 'static,
        S: Handler,
        S::Future: Send + 'static,
    {
        let max = settings.max_connections.min(tokio::sync::Semaphore::MAX_PERMITS);
        let slots = Arc::new(tokio::sync::Semaphore::new(max));
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
        .max_concurrent_streams(100)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// What every listener serves: an infallible HTTP service (errors are responses).
trait Handler:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::proxy::Body>,
        Error = Infallible,
    > + Send
    + 'static
{
}

impl<S> Handler for S where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::proxy::Body>,
            Error = Infallible,
        > + Send
        + 'static
{
}

/// Per-listener connection settings.
#[derive(Clone)]
struct Listener {
    grace: Duration,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    max_connections: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Shutdown phases sent to connections.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CLOSING: u8 = 2;

async fn serve<F, S>(
    listener: TcpListener,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut shutdown: watch::Receiver<bool>,
    settings: Listener,
    slots: Arc<tokio::sync::Semaphore>,
    make_service: F,
) where
    F: Fn(crate::proxy::Conn) -> S + Clone + Send + 'static,
    S: Handler,
    S::Future: Send + 'static,
{
    let max = settings.max_connections.min(tokio::sync::Semaphore::MAX_PERMITS);
    let (phase, _) = watch::channel(RUNNING);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, usually: pause instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the connection limit, this connection waits for a slot and the loop accepts no
        // more: further clients wait in the kernel's queue. The slot is taken after accepting,
        // so a worker with nobody to accept holds none that another worker's client could use.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let stream = TrackedIo { inner: stream, activity: activity.clone() };
        let (builder, phase, settings) = (builder.clone(), phase.subscribe(), settings.clone());
        let plain = crate::proxy::Conn { remote, secure: false, client_cert: false, forward: false };
        match settings.tls.clone() {
            None => {
                let service = Tracked { inner: make_service(plain), activity: activity.clone() };
                tokio::spawn(async move {
                    let _permit = permit;
                    drive(&builder, TokioIo::new(stream), service, &activity, &settings, phase, remote).await;
                });
            }
            Some(acceptor) => {
                let make_service = make_service.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let handshake =
                        tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream)).await;
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let has_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                    let conn =
                        crate::proxy::Conn { remote, secure: true, client_cert: has_cert, forward: false };
                    let service = Tracked { inner: make_service(conn), activity: activity.clone() };
                    drive(&builder, TokioIo::new(tls), service, &activity, &settings, phase, remote).await;
                });
            }
        }
    }
    drop(listener);
    let _ = phase.send(DRAINING);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(settings.grace, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
        let _ = phase.send(CLOSING);
    }
}

/// Serves one connection until it ends, goes idle, or shutdown closes it.
async fn drive<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    activity: &Activity,
    settings: &Listener,
    mut phase: watch::Receiver<u8>,
    remote: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Handler,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let check_every = (settings.idle_timeout / 4).max(Duration::from_millis(50));
    let mut idle_since = tokio::time::Instant::now();
    let mut draining = false;
    loop {
        if !draining && *phase.borrow() >= DRAINING {
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == CLOSING {
                    return;
                }
            }
            () = tokio::time::sleep(check_every) => {
                if activity.busy_since_last_check() {
                    idle_since = tokio::time::Instant::now();
                } else if idle_since.elapsed() >= settings.idle_timeout {
                    // Nothing in flight and no bytes moved: dropping the connection closes it.
                    tracing::debug!(%remote, "closing idle connection");
                    return;
                }
            }
        }
    }
}

/// When a connection last moved bytes and how many of its requests are in flight.
///
/// Reads and writes only set a flag (no clock read on the hot path); the connection's watchdog
/// samples and clears it.
struct Activity {
    moved: std::sync::atomic::AtomicBool,
    active: std::sync::atomic::AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity { moved: false.into(), active: 0.into() }
    }

    fn touch(&self) {
        self.moved.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// True if a request is in flight or bytes moved since the last call.
    fn busy_since_last_check(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed) > 0
            || self.moved.swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

/// A socket that records when bytes last moved.
struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A service that counts its in-flight requests (until the response head) in [`Activity`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.activity.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TrackedFuture { inner: self.inner.call(req), activity: Some(self.activity.clone()) }
    }
}

pin_project_lite::pin_project! {
    /// The service future; decrements the in-flight count when it completes or is dropped.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        activity: Option<Arc<Activity>>,
    }

    impl<F> PinnedDrop for TrackedFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(a) = this.project().activity.take() {
                a.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl<F: std::future::Future> std::future::Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some(a) = this.activity.take() {
            a.touch();
            a.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        std::task::Poll::Ready(out)
    }
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
