//! Carries a WebSocket connection's bytes both ways until one side ends it, it idles, its
//! lifetime is over or the listener drains. When tokengate ends it, each side gets a close frame
//! (1001, going away) at a frame boundary, and then the connection closes.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use super::frames::{self, Frames};

/// Read buffer per direction.
const BUF: usize = 16 * 1024;
/// How long a frame in progress may take to finish before the close frame goes in its place.
const FINISH_FRAME: Duration = Duration::from_secs(1);
/// Status code of the close frames tokengate sends: the endpoint is going away.
const GOING_AWAY: u16 = 1001;

/// Why a tunnel ended; the `reason` label of `tokengate_websocket_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it.
    Client,
    /// The upstream closed it.
    Upstream,
    /// Nothing crossed it for `idle_timeout`.
    Idle,
    /// `websocket_max_lifetime` was reached.
    Lifetime,
    /// The listener is shutting down.
    Draining,
    /// A side stopped taking data for `idle_timeout`, or a read or write failed.
    Error,
}

impl Ended {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ended::Client => "client",
            Ended::Upstream => "upstream",
            Ended::Idle => "idle",
            Ended::Lifetime => "lifetime",
            Ended::Draining => "draining",
            Ended::Error => "error",
        }
    }
}

/// When a tunnel ends on tokengate's side.
pub struct Limits {
    /// Close after this long with nothing crossing in either direction.
    pub idle: Duration,
    /// Close at this moment (`websocket_max_lifetime`).
    pub close_at: Option<Instant>,
}

/// One direction: what reads from one side and writes to the other, and where its frames are.
struct Direction<R, W> {
    from: ReadHalf<R>,
    to: WriteHalf<W>,
    frames: Frames,
    buf: Box<[u8]>,
    open: bool,
    // Frames going this way are masked (client to server).
    masked: bool,
}

impl<R: AsyncRead, W: AsyncWrite> Direction<R, W> {
    fn new(from: ReadHalf<R>, to: WriteHalf<W>, masked: bool) -> Self {
        Direction { from, to, frames: Frames::default(), buf: vec![0; BUF].into(), open: true, masked }
    }

    /// Forwards `n` bytes just read, within `limit`.
    async fn forward(&mut self, n: usize, limit: Duration) -> bool {
        self.frames.advance(&self.buf[..n], false);
        let written = async {
            self.to.write_all(&self.buf[..n]).await?;
            self.to.flush().await
        };
        matches!(tokio::time::timeout(limit, written).await, Ok(Ok(())))
    }

    /// Handles what a read from this direction's source gave: forwards data, or at the end
    /// shuts the other side's writing. `side` is who sent it; `first` becomes it when it began
    /// the closing handshake or ended first. Some when the tunnel failed.
    async fn took(
        &mut self,
        read: std::io::Result<usize>,
        side: Ended,
        first: &mut Option<Ended>,
        limit: Duration,
    ) -> Option<Ended> {
        match read {
            Ok(0) | Err(_) => {
                self.open = false;
                let _ = self.to.shutdown().await;
                first.get_or_insert(side);
            }
            Ok(n) => {
                if !self.forward(n, limit).await {
                    return Some(Ended::Error);
                }
                if self.frames.closing() {
                    first.get_or_insert(side);
                }
            }
        }
        None
    }

    /// Forwards until the frame in progress (if any) is complete, then sends a close frame and
    /// shuts the write side. A frame that does not finish in time gets no close frame.
    async fn close(&mut self) {
        let finish = async {
            while self.open && !self.frames.at_boundary() {
                let n = self.from.read(&mut self.buf).await?;
                if n == 0 {
                    self.open = false;
                    return Ok(false);
                }
                // What follows the boundary begins the next frame, which the close replaces.
                let take = self.frames.advance(&self.buf[..n], true);
                self.to.write_all(&self.buf[..take]).await?;
            }
            Ok::<_, std::io::Error>(true)
        };
        let at_boundary = matches!(tokio::time::timeout(FINISH_FRAME, finish).await, Ok(Ok(true)));
        let done = async {
            if at_boundary {
                let mask = self.masked.then(rand::random::<[u8; 4]>);
                self.to.write_all(&frames::close(GOING_AWAY, mask)).await?;
            }
            self.to.shutdown().await
        };
        let _ = tokio::time::timeout(FINISH_FRAME, done).await;
    }
}

/// Relays between `client` and `upstream` until the tunnel ends, and says why.
pub async fn relay<C, U>(client: C, upstream: U, limits: Limits, mut drain: watch::Receiver<bool>) -> Ended
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let mut up = Direction::new(client_read, upstream_write, true);
    let mut down = Direction::new(upstream_read, client_write, false);
    let mut last = Instant::now();
    // A tunnel opened while the connection drains closes at once.
    drain.mark_changed();
    // The side that began the closing handshake, or else closed its connection, first.
    let mut first = None;
    loop {
        let idle_at = last + limits.idle;
        let wake = limits.close_at.map_or(idle_at, |at| at.min(idle_at));
        tokio::select! {
            r = up.from.read(&mut up.buf), if up.open => {
                if let Some(ended) = up.took(r, Ended::Client, &mut first, limits.idle).await {
                    return ended;
                }
                if !down.open {
                    return first.unwrap_or(Ended::Client);
                }
                last = Instant::now();
            }
            r = down.from.read(&mut down.buf), if down.open => {
                if let Some(ended) = down.took(r, Ended::Upstream, &mut first, limits.idle).await {
                    return ended;
                }
                if !up.open {
                    return first.unwrap_or(Ended::Upstream);
                }
                last = Instant::now();
            }
            () = tokio::time::sleep_until(wake) => {
                if limits.close_at.is_some_and(|at| Instant::now() >= at) {
                    return close(&mut up, &mut down, Ended::Lifetime).await;
                }
                if Instant::now() >= last + limits.idle {
                    return close(&mut up, &mut down, Ended::Idle).await;
                }
            }
            changed = drain.changed() => {
                if changed.is_err() || *drain.borrow() {
                    return close(&mut up, &mut down, Ended::Draining).await;
                }
            }
        }
    }
}

/// tokengate ends the tunnel: close frames both ways, at frame boundaries.
async fn close<C, U>(up: &mut Direction<C, U>, down: &mut Direction<U, C>, why: Ended) -> Ended
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    tokio::join!(up.close(), down.close());
    why
}
