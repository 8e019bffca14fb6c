//! The access log, off the request path.
//!
//! A request appends its line to a buffer of the thread serving it (an uncontended lock); a
//! buffer that reaches [`FLUSH_SIZE`] is handed to a writer thread, which also collects every
//! buffer each [`FLUSH_EVERY`], as nginx does with `access_log ... buffer=64k flush=1s`. Nothing on
//! the request path makes a system call. If the writer falls behind by more than [`BACKLOG`]
//! buffers, the newest are dropped and counted (`tokengate_access_log_dropped_total`) rather than
//! block a request, and the writer says so in the log.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogTo};
use crate::text::{ip, number, three_digits, timestamp};

/// A thread's buffer is handed to the writer at this size.
const FLUSH_SIZE: usize = 64 * 1024;
/// Every buffer is written at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Full buffers waiting for the writer before new ones are dropped (4 MiB).
const BACKLOG: usize = 64;

/// What one request's line says.
pub struct Record<'a> {
    /// `X-Request-Id`.
    pub request_id: &'a str,
    /// The client's address.
    pub client: IpAddr,
    /// The method.
    pub method: &'a str,
    /// The path (normal form), without the query.
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    /// The request's `User-Agent`, if any (cut to [`USER_AGENT_MAX`] bytes).
    pub user_agent: Option<&'a str>,
    /// Request body bytes, when the request declared them (`Content-Length`).
    pub bytes_in: Option<u64>,
    /// Time from sending the request upstream until its response head (the last attempt's,
    /// after a 401 replay); none when nothing was sent.
    pub upstream_duration: Option<Duration>,
    /// The response status.
    pub status: u16,
    /// Response body bytes, when known up front.
    pub bytes: Option<u64>,
    /// Time until the response head.
    pub duration: Duration,
    /// Route label (`_unmatched` when none).
    pub route: &'a str,
    /// The route's upstream URL.
    pub upstream: Option<&'a str>,
    /// The route's provider.
    pub provider: Option<&'a str>,
    /// The caller's name (`callers:`), when one was identified.
    pub caller: Option<&'a str>,
    /// The `error` code of tokengate's own JSON answer (`token_unavailable`, ...), if it made one.
    pub error: Option<&'static str>,
    /// The request's `Host` (or HTTP/2 `:authority`), cut to [`USER_AGENT_MAX`] bytes.
    pub host: Option<&'a str>,
    /// A token had to be fetched for this request.
    pub token_fetched: bool,
    /// The request was replayed after an upstream 401.
    pub replayed: bool,
}

/// Longest `User-Agent` written; longer ones are cut (a client controls it, and lines should
/// stay short).
pub const USER_AGENT_MAX: usize = 256;

/// The access log of one running instance. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    inner: Option<Arc<Shared>>,
}

struct Shared {
    id: u64,
    format: AccessLogFormat,
    buffers: Buffers,
    to_writer: mpsc::SyncSender<Message>,
    dropped: prometheus::IntCounter,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    reopen: Arc<AtomicBool>,
}

/// Every thread's buffer of one access log; the writer sweeps them.
type Buffers = Arc<Mutex<Vec<Arc<Mutex<Buffer>>>>>;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    lines: u64,
}

enum Message {
    /// A full buffer and how many lines it holds.
    Full(Vec<u8>, u64),
    /// Write everything buffered, then answer.
    Flush(mpsc::SyncSender<()>),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's buffer for each access log it has written to.
    static MINE: RefCell<Vec<(u64, Arc<Mutex<Buffer>>)>> = const { RefCell::new(Vec::new()) };
}

impl AccessLog {
    /// No access log.
    pub fn off() -> Self {
        AccessLog { inner: None }
    }

    /// Starts the writer thread for `config`; `metrics` gets the line counters.
    pub fn start(config: &AccessLogConfig, metrics: &crate::metrics::Metrics) -> std::io::Result<Self> {
        let sink = match &config.to {
            AccessLogTo::Off => return Ok(Self::off()),
            AccessLogTo::Stderr => Sink::Stderr,
            AccessLogTo::File(path) => Sink::File(path.clone(), open(path)?),
        };
        let (to_writer, from_requests) = mpsc::sync_channel(BACKLOG);
        let reopen = Arc::new(AtomicBool::new(false));
        let buffers = Buffers::default();
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            format: config.format.unwrap_or_default(),
            buffers: buffers.clone(),
            to_writer,
            dropped: metrics.access_log_dropped.clone(),
            writer: Mutex::new(None),
            reopen: reopen.clone(),
        });
        let lines = metrics.access_log_lines.clone();
        let dropped = metrics.access_log_dropped.clone();
        let handle = std::thread::Builder::new().name("tokengate-access-log".into()).spawn(move || {
            Writer { sink, reopen, lines, dropped, reported: 0, buffers, write_errors: Default::default() }
                .run(from_requests)
        })?;
        *shared.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(AccessLog { inner: Some(shared) })
    }

    /// True when lines are written.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Appends one request's line to this thread's buffer.
    pub fn record(&self, r: &Record<'_>) {
        let Some(shared) = &self.inner else { return };
        let buffer = MINE.with(|mine| {
            let mut mine = mine.borrow_mut();
            if let Some((_, b)) = mine.iter().find(|(id, _)| *id == shared.id) {
                return b.clone();
            }
            let b = Arc::new(Mutex::new(Buffer { bytes: Vec::with_capacity(FLUSH_SIZE + 1024), lines: 0 }));
            shared.buffers.lock().unwrap_or_else(PoisonError::into_inner).push(b.clone());
            mine.push((shared.id, b.clone()));
            b
        });
        let full = {
            let mut b = buffer.lock().unwrap_or_else(PoisonError::into_inner);
            match shared.format {
                AccessLogFormat::Text => text(&mut b.bytes, r),
                AccessLogFormat::Json => json(&mut b.bytes, r),
            }
            b.lines += 1;
            (b.bytes.len() >= FLUSH_SIZE).then(|| {
                let lines = std::mem::take(&mut b.lines);
                (std::mem::replace(&mut b.bytes, Vec::with_capacity(FLUSH_SIZE + 1024)), lines)
            })
        };
        if let Some((bytes, lines)) = full
            && shared.to_writer.try_send(Message::Full(bytes, lines)).is_err()
        {
            // The writer is behind: drop rather than make a request wait.
            shared.dropped.inc_by(lines);
        }
    }

    /// Writes every buffered line now and waits until it is written (shutdown, tests).
    pub fn flush(&self) {
        let Some(shared) = &self.inner else { return };
        let (done, wait) = mpsc::sync_channel(1);
        if shared.to_writer.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Reopens the file before the next write (SIGUSR1, after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(shared) = &self.inner {
            shared.reopen.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer ends once every sender is gone, after writing what is buffered.
        if let Some(handle) = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let (tx, _) = mpsc::sync_channel(0);
            drop(std::mem::replace(&mut self.to_writer, tx));
            let _ = handle.join();
        }
    }
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

enum Sink {
    Stderr,
    File(PathBuf, std::fs::File),
}

struct Writer {
    sink: Sink,
    reopen: Arc<AtomicBool>,
    lines: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
    // Dropped lines already reported in the log.
    reported: u64,
    buffers: Buffers,
    // A closed or broken sink fails every write: one line a second says so.
    write_errors: crate::log::LogLimit,
}

impl Writer {
    fn run(mut self, from_requests: mpsc::Receiver<Message>) {
        let mut last_sweep = std::time::Instant::now();
        loop {
            match from_requests.recv_timeout(FLUSH_EVERY) {
                Ok(Message::Full(bytes, lines)) => self.write(&bytes, lines),
                Ok(Message::Flush(done)) => {
                    self.sweep();
                    let _ = done.send(());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.sweep();
                    return;
                }
            }
            if last_sweep.elapsed() >= FLUSH_EVERY {
                self.sweep();
                last_sweep = std::time::Instant::now();
            }
        }
    }

    /// Writes what every thread has buffered.
    fn sweep(&mut self) {
        let buffers: Vec<_> = self.buffers.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for b in buffers {
            let (bytes, lines) = {
                let mut b = b.lock().unwrap_or_else(PoisonError::into_inner);
                if b.bytes.is_empty() {
                    continue;
                }
                let lines = std::mem::take(&mut b.lines);
                (std::mem::replace(&mut b.bytes, Vec::with_capacity(FLUSH_SIZE + 1024)), lines)
            };
            self.write(&bytes, lines);
        }
        let dropped = self.dropped.get();
        if dropped > self.reported {
            tracing::warn!(
                dropped = dropped - self.reported,
                "the access log writer fell behind; lines were dropped"
            );
            self.reported = dropped;
        }
    }

    fn write(&mut self, bytes: &[u8], lines: u64) {
        if self.reopen.swap(false, Ordering::Relaxed)
            && let Sink::File(path, file) = &mut self.sink
        {
            match open(path) {
                Ok(f) => *file = f,
                Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log"),
            }
        }
        let written = match &mut self.sink {
            Sink::Stderr => std::io::stderr().lock().write_all(bytes),
            Sink::File(_, f) => f.write_all(bytes),
        };
        match written {
            Ok(()) => self.lines.inc_by(lines),
            Err(e) => {
                self.dropped.inc_by(lines);
                if let Some(suppressed) = self.write_errors.admit() {
                    tracing::error!(error = %e, suppressed, "cannot write the access log");
                }
            }
        }
    }
}

// The line is written byte by byte rather than with `write!`: core::fmt (and float formatting
// for the durations) cost more than everything else the log does per request.

/// Milliseconds with three decimals (`12.345`), rounded to the microsecond.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = (d.as_nanos() + 500) / 1000;
    number(out, micros / 1000);
    out.push(b'.');
    three_digits(out, (micros % 1000) as u32);
}

/// `2026-11-25T17:12:01.123Z ACCESS 10.0.0.7 "GET /api/x HTTP/1.1" 200 1234 1.234ms in=0 upstream_time=1.100ms route=api upstream=https://... provider=p fetched=0 replayed=0 ua="curl/8.5" id=...`
fn text(out: &mut Vec<u8>, r: &Record<'_>) {
    timestamp(out);
    out.extend_from_slice(b" ACCESS ");
    ip(out, r.client);
    out.extend_from_slice(b" \"");
    out.extend_from_slice(r.method.as_bytes());
    out.push(b' ');
    escaped(out, r.path, b'"');
    out.push(b' ');
    out.extend_from_slice(r.protocol.as_bytes());
    out.extend_from_slice(b"\" ");
    number(out, r.status);
    out.push(b' ');
    match r.bytes {
        Some(n) => number(out, n),
        None => out.push(b'-'),
    }
    out.push(b' ');
    millis(out, r.duration);
    out.extend_from_slice(b"ms in=");
    match r.bytes_in {
        Some(n) => number(out, n),
        None => out.push(b'-'),
    }
    if let Some(d) = r.upstream_duration {
        out.extend_from_slice(b" upstream_time=");
        millis(out, d);
        out.extend_from_slice(b"ms");
    }
    // Escaped even where the value is ours: one rule for every field.
    optional(out, b" error=", r.error);
    optional(out, b" host=", r.host);
    optional(out, b" route=", Some(r.route));
    if let Some(u) = r.upstream {
        out.extend_from_slice(b" upstream=");
        out.extend_from_slice(u.as_bytes());
    }
    optional(out, b" provider=", r.provider);
    optional(out, b" caller=", r.caller);
    out.extend_from_slice(if r.token_fetched { b" fetched=1" } else { b" fetched=0" });
    out.extend_from_slice(if r.replayed { b" replayed=1" } else { b" replayed=0" });
    if let Some(ua) = r.user_agent {
        out.extend_from_slice(b" ua=\"");
        escaped(out, ua, b'"');
        out.push(b'"');
    }
    out.extend_from_slice(b" id=");
    out.extend_from_slice(r.request_id.as_bytes());
    out.push(b'\n');
}

/// One JSON object per line.
/// ` key=value`, the value escaped, when there is one.
fn optional(out: &mut Vec<u8>, key: &[u8], value: Option<&str>) {
    if let Some(v) = value {
        out.extend_from_slice(key);
        escaped(out, v, b' ');
    }
}

/// `,"key":"value"` or `,"key":null`.
fn json_optional(out: &mut Vec<u8>, key: &[u8], value: Option<&str>) {
    out.extend_from_slice(key);
    match value {
        Some(v) => json_string(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn json(out: &mut Vec<u8>, r: &Record<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out);
    out.extend_from_slice(b"\",\"log\":\"access\",\"client\":\"");
    ip(out, r.client);
    out.extend_from_slice(b"\",\"method\":");
    json_string(out, r.method);
    out.extend_from_slice(b",\"path\":");
    json_string(out, r.path);
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(r.protocol.as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    number(out, r.status);
    out.extend_from_slice(b",\"bytes\":");
    match r.bytes {
        Some(n) => number(out, n),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"duration_ms\":");
    millis(out, r.duration);
    out.extend_from_slice(b",\"bytes_in\":");
    match r.bytes_in {
        Some(n) => number(out, n),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"upstream_ms\":");
    match r.upstream_duration {
        Some(d) => millis(out, d),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"route\":");
    json_string(out, r.route);
    json_optional(out, b",\"upstream\":", r.upstream);
    json_optional(out, b",\"provider\":", r.provider);
    json_optional(out, b",\"caller\":", r.caller);
    json_optional(out, b",\"error\":", r.error);
    json_optional(out, b",\"host\":", r.host);
    json_optional(out, b",\"user_agent\":", r.user_agent);
    out.extend_from_slice(if r.token_fetched {
        b",\"token_fetched\":true"
    } else {
        b",\"token_fetched\":false"
    });
    out.extend_from_slice(if r.replayed { b",\"replayed\":true" } else { b",\"replayed\":false" });
    out.extend_from_slice(b",\"request_id\":");
    json_string(out, r.request_id);
    out.extend_from_slice(b"}\n");
}

/// A JSON string with everything outside printable ASCII escaped as `\uXXXX`: U+2028, U+0085,
/// bidirectional overrides and the like are valid JSON but break lines or mislead in the viewers
/// logs are read with. Hand-written: serde_json writes them as UTF-8 and has no ASCII-only mode.
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut rest = s;
    while let Some(at) = rest.bytes().position(|b| b == b'"' || b == b'\\' || !is_printable_ascii(b)) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let mut chars = rest[at..].chars();
        let c = chars.next().unwrap_or_default();
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[usize::from((*unit >> shift) & 0xf)]);
                    }
                }
            }
        }
        rest = chars.as_str();
    }
    out.extend_from_slice(rest.as_bytes());
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn is_printable_ascii(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

/// Copies `s`, writing `quote`, backslash and every byte outside printable ASCII as `\xNN` (as
/// nginx does), so a line stays one line and reads the same in any viewer: no control bytes, no
/// Unicode line separators (U+0085, U+2028), no bidirectional overrides (U+202E).
fn escaped(out: &mut Vec<u8>, s: &str, quote: u8) {
    let mut rest = s.as_bytes();
    // Runs of plain bytes are copied whole.
    while let Some(at) = rest.iter().position(|&b| b == quote || b == b'\\' || !is_printable_ascii(b)) {
        out.extend_from_slice(&rest[..at]);
        let b = rest[at];
        out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            request_id: "r-1",
            client: "10.0.0.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            method: "GET",
            path: "/api/\"x\"\\",
            protocol: "HTTP/1.1",
            user_agent: Some("curl/8 \"quoted\""),
            bytes_in: Some(12),
            upstream_duration: Some(Duration::from_micros(1100)),
            status: 200,
            bytes: Some(1234),
            duration: Duration::from_micros(1234),
            route: "api",
            upstream: None,
            provider: Some("p"),
            caller: None,
            error: None,
            host: None,
            token_fetched: false,
            replayed: true,
        }
    }

    #[test]
    fn text_lines_are_one_line_without_colour() {
        let mut out = Vec::new();
        text(&mut out, &record());
        let line = String::from_utf8(out).unwrap_or_default();
        assert!(
            line.ends_with("Z ACCESS 10.0.0.7 \"GET /api/\\x22x\\x22\\x5c HTTP/1.1\" 200 1234 1.234ms in=12 upstream_time=1.100ms route=api provider=p fetched=0 replayed=1 ua=\"curl/8 \\x22quoted\\x22\" id=r-1\n"),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
        assert!(!line.contains('\u{1b}'));
        assert_eq!(&line[4..5], "-");
        assert_eq!(&line[19..20], ".");
        assert_eq!(&line[23..24], "Z");
        let mut out = Vec::new();
        text(&mut out, &Record { caller: Some("billing team"), ..record() });
        let line = String::from_utf8(out).unwrap_or_default();
        assert!(line.contains(" provider=p caller=billing\\x20team fetched=0"), "{line}");
        let mut out = Vec::new();
        text(&mut out, &Record { error: Some("token_unavailable"), host: Some("api host"), ..record() });
        let line = String::from_utf8(out).unwrap_or_default();
        assert!(line.contains(" error=token_unavailable host=api\\x20host route=api"), "{line}");
    }

    #[test]
    fn numbers_and_durations_read_as_core_fmt_writes_them() {
        for nanos in [0u64, 1, 499, 501, 999_400, 1_234_567, 59_999_600, 3_600_000_000_123, 12_345_678_901] {
            let d = Duration::from_nanos(nanos);
            let mut out = Vec::new();
            millis(&mut out, d);
            assert_eq!(
                String::from_utf8(out).unwrap_or_default(),
                format!("{:.3}", d.as_secs_f64() * 1000.0)
            );
        }
        let mut out = Vec::new();
        escaped(&mut out, "\u{1}a b\u{7f}\"", b' ');
        assert_eq!(String::from_utf8(out).unwrap_or_default(), "\\x01a\\x20b\\x7f\"");
    }

    #[test]
    fn everything_outside_printable_ascii_is_escaped() {
        let hostile = "a\u{85}b\u{2028}c\u{2029}d\u{9b}e\u{202e}f\u{1F600}\té\"\\";
        let mut out = Vec::new();
        escaped(&mut out, hostile, b'"');
        assert_eq!(
            String::from_utf8(out).unwrap_or_default(),
            "a\\xc2\\x85b\\xe2\\x80\\xa8c\\xe2\\x80\\xa9d\\xc2\\x9be\\xe2\\x80\\xaef\\xf0\\x9f\\x98\\x80\\x09\\xc3\\xa9\\x22\\x5c"
        );
        let mut out = Vec::new();
        json_string(&mut out, hostile);
        assert!(out.iter().all(|b| is_printable_ascii(*b)), "{}", String::from_utf8_lossy(&out));
        let back: String = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(back, hostile);
    }

    #[test]
    fn json_lines_parse() {
        let mut out = Vec::new();
        json(&mut out, &record());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["path"], "/api/\"x\"\\");
        assert_eq!(v["status"], 200);
        assert_eq!(v["replayed"], true);
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["upstream"], serde_json::Value::Null);
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["user_agent"], "curl/8 \"quoted\"");
        assert_eq!(v["bytes_in"], 12);
        assert_eq!(v["upstream_ms"], 1.1);
        assert!(v["timestamp"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z')));
        assert_eq!(v["log"], "access");
        assert_eq!(v["caller"], serde_json::Value::Null);
        let mut out = Vec::new();
        json(
            &mut out,
            &Record { caller: Some("billing"), error: Some("no_route"), host: Some("h:1"), ..record() },
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(
            (&v["caller"], &v["error"], &v["host"]),
            (&"billing".into(), &"no_route".into(), &"h:1".into())
        );
    }
}
