//! Bounded fan-out: one client cannot open unbounded upstream connections or requests, and the
//! process raises its descriptor limit.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 upstream that answers each request after `hold`, closing the connection after
/// it, and counts how many connections it had open at once.
async fn counting_upstream(hold: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (open, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let p = peak.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (open, peak) = (open.clone(), p.clone());
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Read the head and the body its Content-Length announces.
                let complete = |got: &[u8]| {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    got.len() >= end + 4 + len
                };
                while !complete(&got) {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(hold).await;
                let _ =
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
                let _ = s.shutdown().await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, peak)
}

#[tokio::test]
async fn one_http2_client_cannot_open_more_than_the_upstream_limit() {
    // GETs go through the lean HTTP/1.1 client, bodies above replay_buffer stream through the
    // hyper client: both are bounded, each on its own and mixed.
    for (mode, post) in [("lean", &[false][..]), ("hyper", &[true]), ("mixed", &[false, true])] {
        let (addr, peak) = counting_upstream(Duration::from_millis(800)).await;
        let idp = Idp::start(IdpOptions::default()).await;
        let tg = start(&format!(
            "limits:\n  upstream_max_connections: 4\n  upstream_queue_timeout: 200ms\n{}",
            idp.config_to(&format!("http://{addr}"))
        ))
        .await;
        wait_ready(&tg).await;
        // One HTTP/2 connection, 20 concurrent streams.
        let h2 = h2_client();
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (h2, url) = (h2.clone(), format!("http://{}/fan/{i}", tg.proxy_addr));
            let req =
                if post[i % post.len()] { h2.post(url).body(vec![b'x'; 100 * 1024]) } else { h2.get(url) };
            calls.spawn(async move {
                let r = req.send().await.unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                (r.status().as_u16(), retry, r.text().await.unwrap())
            });
        }
        let (mut ok, mut busy) = (0, 0);
        while let Some(r) = calls.join_next().await {
            let (status, retry, body) = r.unwrap();
            match status {
                200 => ok += 1,
                503 => {
                    assert!(body.contains("upstream_busy"), "{mode}: {body}");
                    assert_eq!(retry.as_deref(), Some("1"), "{mode}");
                    busy += 1;
                }
                other => panic!("{mode}: unexpected {other}: {body}"),
            }
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 4, "{mode}: the upstream saw {peak} connections at once");
        assert_eq!((ok, busy), (4, 16), "{mode}");
        let m = client()
            .get(format!("http://{}/metrics", tg.admin_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            m.contains(r#"tokengate_upstream_errors_total{kind="upstream_busy",route="/"} 16"#),
            "{mode}: {m}"
        );
        // Once the slots are free, requests are served again.
        assert_eq!(
            client().get(format!("http://{}/after", tg.proxy_addr)).send().await.unwrap().status(),
            200
        );
    }
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_get_503_at_once() {
    let idp = Idp::start(IdpOptions::default()).await;
    let slow = Upstream::start_with(None, Duration::from_millis(600)).await;
    let tg = start(&format!("limits:\n  max_requests_in_flight: 2\n{}", idp.config_to(&slow.url()))).await;
    wait_ready(&tg).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..5 {
        let url = format!("http://{}/{i}", tg.proxy_addr);
        calls.spawn(async move {
            let started = std::time::Instant::now();
            let r = client().get(url).send().await.unwrap();
            (r.status().as_u16(), started.elapsed(), r.text().await.unwrap())
        });
    }
    let mut statuses = Vec::new();
    while let Some(r) = calls.join_next().await {
        let (status, took, body) = r.unwrap();
        if status == 503 {
            assert!(body.contains("\"overloaded\""), "{body}");
            assert!(took < Duration::from_millis(500), "refused only after {took:?}");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503, 503, 503]);
    assert_eq!(slow.requests().len(), 2);
}

#[tokio::test]
async fn http2_concurrent_streams_are_configurable() {
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&format!(
        "limits:\n  http2_max_concurrent_streams: 7\n{}",
        idp.config_to("http://127.0.0.1:9")
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect();
    assert!(settings.contains(&(0x3, 7)), "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}");
}

#[test]
fn the_binary_raises_its_descriptor_limit_and_says_how_many_it_has() {
    let hard = std::process::Command::new("sh").args(["-c", "ulimit -Hn"]).output().unwrap();
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_owned();
    if hard != "unlimited" && hard.parse::<u64>().unwrap() <= 1024 {
        panic!("this machine's hard limit on open files is {hard}: the test needs more than 1024");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tg.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {ANY}\nadmin:\n  listen: {ANY}\nproviders:\n  p:\n    type: oauth2\n    token_url: http://127.0.0.1:9/token\n    client_id: a\n    client_secret: b\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: p\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    // Start with the soft limit most machines default to, and stop after the first lines.
    let script = format!(
        "ulimit -Sn 1024; {} --log-format json run -c {} 2> {} & pid=$!; sleep 1; kill -TERM $pid; wait $pid",
        env!("CARGO_BIN_EXE_tokengate"),
        path.display(),
        log.display()
    );
    std::process::Command::new("sh").args(["-c", &script]).status().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("file descriptors")).unwrap_or_else(|| panic!("{text}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    // JSON logs are flat: fields at the top level.
    let available = v["available"].as_u64().unwrap();
    assert!(available > 1024, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_make_room_for_requests_waiting_on_any_worker() {
    // A keep-alive upstream: finished connections go back to their worker's idle list and keep
    // their slot. Requests waiting for a slot (on either worker) must get one by closing an idle
    // connection, not fail after the queue timeout.
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start_with(None, Duration::from_millis(20)).await;
    let yaml = format!(
        "listen: {ANY}\nadmin:\n  listen: {ANY}\naccess_log: off\nlimits:\n  upstream_max_connections: 2\n  upstream_queue_timeout: 2s\n{}",
        idp.config_to(&up.url())
    );
    let config = tokengate::config::parse(&yaml, "test.yaml").unwrap();
    let workers = tokengate::server::Workers::Threads(std::num::NonZeroUsize::new(2).unwrap());
    let tg = tokengate::server::start_with(config, None, workers).await.unwrap();
    wait_ready(&tg).await;
    for round in 0..3 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..40 {
            // A client per request: new connections, spread over both workers.
            let url = format!("http://{}/r{round}/{i}", tg.proxy_addr);
            calls.spawn(async move { client().get(url).send().await.unwrap().status().as_u16() });
        }
        let mut statuses = Vec::new();
        while let Some(s) = calls.join_next().await {
            statuses.push(s.unwrap());
        }
        assert!(statuses.iter().all(|s| *s == 200), "round {round}: {statuses:?}");
    }
    assert_eq!(up.requests().len(), 120);
    tg.shutdown().await;
}

/// tokengate with `upstream_max_connections: 2`, a 1 s queue timeout and `limits` more, in
/// front of a keep-alive upstream.
async fn two_slots(limits: &str) -> (Upstream, tokengate::server::Running) {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "limits:\n  upstream_max_connections: 2\n  upstream_queue_timeout: 1s\n{limits}{}",
        idp.config_to(&up.url())
    ))
    .await;
    wait_ready(&tg).await;
    (up, tg)
}

/// Uploads too large to buffer (chunked, or with a length past the replay buffer) go through
/// another client than ordinary requests. Its finished connections must not keep their slots:
/// after as many concurrent uploads as there are slots, an ordinary request is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_uploads_leave_no_slot_behind() {
    let (up, tg) = two_slots("  replay_buffer: 1KiB\n").await;
    let body = "x".repeat(8 * 1024);
    let (first, rest) = body.split_at(4096);
    for framing in ["chunked", "sized"] {
        // Both slots in use at once: the first half of each body, then the rest.
        let mut sockets = Vec::new();
        for n in 0..2 {
            let head = match framing {
                "chunked" => format!(
                    "POST /{framing}/{n} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
                    first.len()
                ),
                _ => format!(
                    "POST /{framing}/{n} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{first}",
                    body.len()
                ),
            };
            let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            sockets.push(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for s in &mut sockets {
            let tail = match framing {
                "chunked" => format!("{:x}\r\n{rest}\r\n0\r\n\r\n", rest.len()),
                _ => rest.to_owned(),
            };
            s.write_all(tail.as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        }
        // The clients keep their connections open: only tokengate's side may free the slots.
        let started = std::time::Instant::now();
        let r = client().get(format!("http://{}/after-{framing}", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        assert!(started.elapsed() < Duration::from_millis(500), "waited {:?} for a slot", started.elapsed());
        std::mem::forget(sockets);
    }
    assert_eq!(up.requests().len(), 6);
}

/// A body trickled in with pauses just under `body_read_timeout` falls below `body_min_rate` and
/// is cut off (408), freeing its slot: two such clients cannot shut others out for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_uploads_are_cut_off_and_free_their_slots() {
    let (up, tg) =
        two_slots("  body_read_timeout: 400ms\n  body_min_rate: 500\n  replay_buffer: 1KiB\n").await;
    let mut tricklers = Vec::new();
    for n in 0..2 {
        let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
        let head = format!("PUT /trickle/{n} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        tricklers.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            // One byte every 300 ms: never a pause as long as the timeout.
            while s.write_all(b"x").await.is_ok() && started.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut buf = [0u8; 256];
                if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    return (String::from_utf8_lossy(&buf[..n]).into_owned(), started.elapsed());
                }
            }
            (String::new(), started.elapsed())
        }));
    }
    for t in tricklers {
        let (answer, after) = t.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?} after {after:?}");
        assert!(after < Duration::from_secs(3), "cut off only after {after:?}");
    }
    let r = client().get(format!("http://{}/ordinary", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(up.requests().iter().all(|s| !s.path.starts_with("/trickle") || s.body.len() < 100));
}
