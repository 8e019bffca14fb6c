//! Listening sockets and worker threads: one socket per worker on a shared port
//! (`SO_REUSEPORT`), each served by its own single-threaded event loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::StartError;
use super::connection::{Handler, Listener, Slots, serve};
use crate::config::Limits;

/// One listener's serving loop on one worker.
pub(super) type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A listening address with one socket per worker.
pub(super) struct SharedListener {
    pub(super) addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// Binds `count` sockets to `addr` (for port 0, the port the first one got). More than one uses
/// `SO_REUSEPORT`, so the kernel spreads new connections over the workers.
pub(super) fn bind_shared(addr: SocketAddr, count: usize) -> Result<SharedListener, StartError> {
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
    // SO_REUSEPORT would let a second tokengate (same user) bind the port too, and the kernel
    // would split connections between two configurations. A socket without it cannot bind a port
    // anyone listens on, so one is bound and dropped first: the port must be free.
    if count > 1 && addr.port() != 0 {
        let probe =
            if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
        probe.and_then(|p| p.set_reuseaddr(true).and_then(|()| p.bind(addr))).map_err(failed)?;
    }
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
    pub(super) fn serve<F, S>(
        self,
        builder: Arc<auto::Builder<TokioExecutor>>,
        shutdown: watch::Receiver<bool>,
        settings: Listener,
        max_connections: usize,
        make_service: F,
    ) -> Vec<ServeFuture>
    where
        F: Fn(crate::proxy::Conn, &crate::proxy::websocket::ConnTunnels) -> S + Clone + Send + Sync + 'static,
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
pub(super) fn spawn_worker(
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
            crate::upstream::h1::set_worker(index);
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

pub(super) fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection watchdog times request heads itself: hyper's timer would also run
        // while a keep-alive connection waits for its next request, which is idle_timeout's.
        .header_read_timeout(None)
        // hyper's minimum buffer is 8 KiB; the limit is also what bounds header size.
        .max_buf_size(usize::try_from(limits.max_header_size).unwrap_or(usize::MAX).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        // WebSocket over HTTP/2 (RFC 8441); routes without `websocket: true` answer 501.
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
