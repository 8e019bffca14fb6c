//! The operator log can never stop or slow the proxy: not when stderr is closed or stalled, not
//! when a peer makes a library repeat a line, not when the log file sits in a watched directory.
//! Each test drives the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A configuration with a working route `/ok` and a route `/down` whose upstream refuses
/// connections (every request logs a warning, rate-limited per route).
fn config(dir: &Path, proxy: SocketAddr, admin: SocketAddr, idp: &Idp, up: &Upstream) -> std::path::PathBuf {
    let path = dir.join("tokengate.yaml");
    let yaml = format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\naccess_log: off\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /ok\n    upstream: {}\n    provider: idp\n  - prefix: /down\n    upstream: http://{}\n    provider: idp\n",
        idp.token_url(),
        up.url(),
        closed_port(),
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

async fn setup() -> (tempfile::TempDir, Idp, Upstream, SocketAddr, SocketAddr) {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    (tempfile::tempdir().unwrap(), idp, up, closed_port(), closed_port())
}

/// An HTTP/2 prior-knowledge connection that has sent its preface and an empty SETTINGS frame.
async fn h2c(proxy: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    s
}

/// `n` PING frames with the ACK flag, none of them answering a PING of the server's.
fn unsolicited_ping_acks(n: usize) -> Vec<u8> {
    let frame = [0, 0, 8, 6, 1, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    frame.repeat(n)
}

/// Sends `bytes` and keeps reading what comes back (so the server is never blocked on us)
/// until the server goes quiet.
async fn send_draining(mut s: tokio::net::TcpStream, bytes: &[u8]) {
    let (mut r, mut w) = s.split();
    let drain = async {
        let mut buf = vec![0u8; 65536];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), r.read(&mut buf)).await {
            if n == 0 {
                break;
            }
        }
    };
    let send = async {
        let _ = w.write_all(bytes).await;
    };
    tokio::join!(drain, send);
}

/// `n` requests to `/ok`, each on a new connection; how many got a 200 within `limit`.
async fn answered_within(proxy: SocketAddr, n: usize, limit: Duration) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(async move {
            let request = fresh_client().get(format!("http://{proxy}/ok/{i}")).send();
            matches!(tokio::time::timeout(limit, request).await, Ok(Ok(r)) if r.status() == 200)
        });
    }
    tasks.join_all().await.into_iter().filter(|ok| *ok).count()
}

/// When whatever reads stderr goes away, tokengate goes on serving, reloading and logging (into
/// nothing), and stops cleanly on SIGTERM (exit 0, not a panic's 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_neither_panics_nor_stops_the_proxy() {
    let (dir, idp, up, proxy, admin) = setup().await;
    let path = config(dir.path(), proxy, admin, &idp, &up);
    let (reader, writer) = std::io::pipe().unwrap();
    let mut p = Process::spawn_with(&path, admin, &[], writer.into());
    p.ready().await;
    drop(reader);

    for round in 0..3 {
        // A reload, a warning from every failing request and one from its log limit's next second.
        p.signal("-HUP");
        for i in 0..20 {
            let status = client().get(format!("http://{proxy}/down/{i}")).send().await.unwrap().status();
            assert_eq!(status, 502);
        }
        assert_eq!(answered_within(proxy, 4, Duration::from_secs(3)).await, 4, "round {round}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(p.exited_within(Duration::from_millis(200)).await, None, "tokengate exited");
    p.signal("-TERM");
    assert_eq!(p.exited_within(Duration::from_secs(10)).await, Some(Some(0)));
}

/// Every unsolicited PING ACK makes h2 write a warning. A flood of them writes about one line a
/// second; the rest are counted, and normal requests are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_library_warnings_is_limited_and_counted() {
    let (dir, idp, up, proxy, admin) = setup().await;
    let path = config(dir.path(), proxy, admin, &idp, &up);
    let p = Process::spawn(&path, admin);
    p.ready().await;

    const N: usize = 20_000;
    send_draining(h2c(proxy).await, &unsolicited_ping_acks(N)).await;
    assert_eq!(answered_within(proxy, 8, Duration::from_secs(3)).await, 8);
    let log = p.logged("PING ack that we never sent").await;
    let lines = log.lines().filter(|l| l.contains("PING ack that we never sent")).count();
    assert!((1..=3).contains(&lines), "{lines} lines for {N} PING ACKs");
    let held = metric_value(admin, r#"tokengate_log_lines_dropped_total{reason="rate_limited"}"#).await;
    assert!(held.is_some_and(|n| n >= (N - 3) as f64), "rate_limited = {held:?}");
}

/// With stderr on a pipe that nobody reads, a flood of log lines (connections that end in
/// errors, at `--log debug`, plus PING ACKs) fills the pipe; lines are then dropped and counted,
/// and every normal request is still answered in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_blocks_no_worker() {
    let (dir, idp, up, proxy, admin) = setup().await;
    let path = config(dir.path(), proxy, admin, &idp, &up);
    let (_reader, writer) = std::io::pipe().unwrap();
    let p = Process::spawn_with(&path, admin, &["--workers", "1", "--log", "debug"], writer.into());
    p.ready().await;

    let mut floods = tokio::task::JoinSet::new();
    for _ in 0..4 {
        floods.spawn(async move {
            for _ in 0..1500 {
                let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await else { continue };
                let _ = s
                    .write_all(b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nshort")
                    .await;
                drop(s);
            }
        });
    }
    floods.spawn(async move { send_draining(h2c(proxy).await, &unsolicited_ping_acks(3000)).await });
    floods.join_all().await;
    let started = Instant::now();
    assert_eq!(answered_within(proxy, 8, Duration::from_secs(3)).await, 8);
    assert!(started.elapsed() < Duration::from_secs(3));
    let behind = metric_value(admin, r#"tokengate_log_lines_dropped_total{reason="writer_behind"}"#).await;
    assert!(behind.is_some_and(|n| n > 0.0), "the pipe never filled: writer_behind = {behind:?}");
}

/// With the log file in the watched configuration directory and `--log trace`, writing a line
/// is a change in that directory, which is traced, which is a line: idle, the log must stay quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_in_the_watched_directory_does_not_feed_itself() {
    let (dir, idp, up, proxy, admin) = setup().await;
    let path = config(dir.path(), proxy, admin, &idp, &up);
    let log = dir.path().join("tokengate.log");
    let file = std::fs::File::create(&log).unwrap();
    let p = Process::spawn_with(&path, admin, &["--log", "trace"], file.into());
    p.ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = std::fs::metadata(&log).unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = std::fs::metadata(&log).unwrap().len() - before;
    assert!(grown < 64 * 1024, "the idle log grew {grown} bytes in 2 s");

    // A real change in the directory is still seen.
    let yaml = std::fs::read_to_string(&path).unwrap().replace("prefix: /ok", "prefix: /renamed");
    std::fs::write(&path, yaml).unwrap();
    let mut status = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = client().get(format!("http://{proxy}/renamed/x")).send().await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200, "the edit was not reloaded");
}

/// With `--log-format json`, the operator log and the access log share stderr: every line is a
/// JSON object with the same `timestamp` key and format, and `log` says which log it is from.
/// Requests hyper answers itself (a malformed head: 400; a head over max_header_size: 431) have
/// access-log lines too, with the error code the client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_logs_share_the_timestamp_and_say_which_they_are_and_parse_errors_are_logged() {
    let (dir, idp, up, proxy, admin) = setup().await;
    let path = config(dir.path(), proxy, admin, &idp, &up);
    let yaml = std::fs::read_to_string(&path).unwrap().replace("access_log: off\n", "");
    std::fs::write(&path, yaml).unwrap();
    let log = dir.path().join("stderr.log");
    let p = Process::spawn_with(
        &path,
        admin,
        &["--log-format", "json"],
        std::fs::File::create(&log).unwrap().into(),
    );
    p.ready().await;
    assert_eq!(client().get(format!("http://{proxy}/ok/1")).send().await.unwrap().status(), 200);
    let malformed = raw(proxy, b"GET /ok/2 HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n").await;
    assert!(
        malformed.starts_with("HTTP/1.1 400 ") && malformed.contains("\"invalid_request\""),
        "{malformed}"
    );
    let huge = format!("GET /ok/3 HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(80 * 1024));
    let too_large = raw(proxy, huge.as_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 431 "), "{too_large}");

    let mut access = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&log).unwrap();
        access =
            text.lines().filter(|l| l.contains("\"log\":\"access\"")).map(str::to_owned).collect::<Vec<_>>();
        if access.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut kinds = std::collections::BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let t = v["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {line}"));
        assert!(t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T" && &t[19..20] == ".", "{line}");
        *kinds
            .entry(v["log"].as_str().unwrap_or_else(|| panic!("no log field: {line}")).to_owned())
            .or_insert(0) += 1;
    }
    assert!(kinds.get("app").is_some_and(|n| *n > 0) && kinds.len() == 2, "{kinds:?}");
    let access: Vec<serde_json::Value> = access.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(access.len(), 3, "{access:#?}");
    let answered = |status: u64, error: &str| {
        access.iter().any(|a| {
            a["status"] == status
                && a["error"] == error
                && a["client"] == "127.0.0.1"
                && a["route"] == "_unmatched"
        })
    };
    assert!(answered(400, "invalid_request") && answered(431, "headers_too_large"), "{access:#?}");
    assert!(access.iter().any(|a| a["status"] == 200 && a["path"] == "/ok/1"), "{access:#?}");
}
