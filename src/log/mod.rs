//! The operator log: where lines go and what bounds them.
//!
//! Two rules hold whatever the reader of stderr does (a log shipper that exits, `| tee` that is
//! closed, a container runtime's pipe that stalls) and whatever a remote peer sends:
//! - no log write blocks a worker or ends the process: lines go through a bounded, lossy queue
//!   to a writer thread ([`tracing_appender::non_blocking`]), which ignores write errors (EPIPE
//!   included) and drops lines when it falls behind;
//! - no line a peer can cause is unbounded: tokengate's own request-caused lines are limited where
//!   they are written ([`LogLimit`]); lines from libraries (h2 warns on every unsolicited PING
//!   ACK, rustls on every bad SNI) are limited here, per place in the code ([`library`]).
//!
//! Both kinds of loss are counted: `tokengate_log_lines_dropped_total{reason}`.

mod library;
mod limit;
mod line;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub use limit::{LogLimit, PERIOD};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How many lines may wait for the writer thread before new ones are dropped.
const QUEUE_LINES: usize = 8192;

/// The shape of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event, fields at the top level (as log shippers expect).
    Json,
}

/// Keeps the writer thread; dropping it flushes what is queued (see [`finish`]).
#[must_use = "dropping the guard stops the log writer"]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        finish();
    }
}

static WORKER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes what is queued (waiting at most a second) and stops the writer; later lines are lost.
/// For paths that end the process without unwinding (`std::process::exit`).
pub fn finish() {
    let worker = WORKER.lock().map(|mut w| w.take()).unwrap_or_default();
    drop(worker);
}

/// Lines lost, by reason, since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The writer fell behind (a slow or stalled stderr) and the queue was full.
    pub writer_behind: u64,
    /// Held back by a rate limit: lines from libraries that a peer can repeat at will.
    pub rate_limited: u64,
}

static WRITER_ERRORS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();
static RATE_LIMITED: AtomicU64 = AtomicU64::new(0);

/// Lines lost so far (for the metrics).
pub fn dropped() -> Dropped {
    Dropped {
        writer_behind: WRITER_ERRORS.get().map_or(0, |c| c.dropped_lines() as u64),
        rate_limited: RATE_LIMITED.load(Ordering::Relaxed),
    }
}

/// Installs the process's log: `filter` (an `EnvFilter` directive string), to stderr, in
/// `format`, with colour when `ansi`.
pub fn init(filter: tracing_subscriber::EnvFilter, format: Format, ansi: bool) -> Guard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("tokengate-log")
        .finish(std::io::stderr());
    let _ = WRITER_ERRORS.set(writer.error_counter());
    // The writer never fails (the queue takes the line or drops it), but the layer would report
    // a failure with eprintln!, which panics on a closed stderr.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .with_timer(line::Millis);
    let fmt = match format {
        Format::Text => fmt.boxed(),
        Format::Json => fmt
            .event_format(line::Tagged(
                tracing_subscriber::fmt::format().json().flatten_event(true).with_timer(line::Millis),
            ))
            .boxed(),
    };
    let _ = tracing_subscriber::registry().with(filter).with(library::Limit::default()).with(fmt).try_init();
    if let Ok(mut w) = WORKER.lock() {
        *w = Some(guard);
    }
    Guard(())
}

/// Every [`SUMMARY_PERIOD`], says how many library lines were held back, so an operator who
/// sees one h2 warning a second knows there were thousands. Runs until the task is aborted.
pub async fn summarize_held_lines() {
    let mut ticks = tokio::time::interval(library::SUMMARY_PERIOD);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if let Some((held, target)) = library::take_held() {
            tracing::warn!(
                held,
                target = %target,
                "log lines from libraries were held back (at most one per second from each place in their code; see tokengate_log_lines_dropped_total)"
            );
        }
    }
}
