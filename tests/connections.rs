//! Every connection must earn its slot: hostile clients send raw bytes or raw HTTP/2 frames and
//! the tests assert what they got back and that normal clients and probes are still served.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;

/// How long until the server closes a connection that has sent `bytes`, reading (and
/// discarding) whatever it sends; `None` if it stays open for `wait`.
async fn closed_after(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + wait).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn metrics(tg: &tokengate::server::Running) -> String {
    client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap()
}

fn closed_count(metrics: &str, listener: &str, reason: &str) -> u64 {
    let key = format!(r#"tokengate_connections_closed_total{{listener="{listener}",reason="{reason}"}} "#);
    metrics.lines().find_map(|l| l.strip_prefix(&key)).map_or(0, |v| v.trim().parse().unwrap())
}

async fn proxy_with(limits: &str) -> (Upstream, tokengate::server::Running) {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!("limits:\n{limits}{}", idp.config_to(&up.url()))).await;
    (up, tg)
}

#[tokio::test]
async fn a_connection_must_send_its_first_request_head_within_the_header_timeout() {
    let (up, tg) = proxy_with("  header_read_timeout: 300ms\n  idle_timeout: 60s\n").await;
    let mut partial_settings = PREFACE.to_vec();
    partial_settings.extend_from_slice(&frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])[..11]);
    let hostile: [(&str, Vec<u8>); 6] = [
        ("nothing", Vec::new()),
        ("a few bytes", b"GE".to_vec()),
        ("a partial request head", b"GET / HTTP/1.1\r\nHost: localhost\r\n".to_vec()),
        ("a partial HTTP/2 preface", PREFACE[..10].to_vec()),
        ("the preface without SETTINGS", PREFACE.to_vec()),
        ("the preface and part of SETTINGS", partial_settings),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for (what, bytes) in hostile.clone() {
        for addr in [tg.proxy_addr, tg.admin_addr] {
            let bytes = bytes.clone();
            tasks
                .spawn(async move { (what, addr, closed_after(addr, &bytes, Duration::from_secs(5)).await) });
        }
    }
    while let Some(r) = tasks.join_next().await {
        let (what, addr, closed) = r.unwrap();
        let after = closed.unwrap_or_else(|| panic!("{addr}: a connection that sent {what} was held open"));
        assert!(after < Duration::from_secs(2), "{addr}: {what}: closed only after {after:?}");
    }
    // hyper's own header timer may close the HTTP/1 ones first; the rest are tokengate's.
    let m = metrics(&tg).await;
    assert!(closed_count(&m, "proxy", "first_request_timeout") >= 4, "{m}");
    assert!(closed_count(&m, "admin", "first_request_timeout") >= 4, "{m}");
    assert!(up.requests().is_empty());
    // A client that sends its request in time is served, on a connection that then stays open.
    let mut s = TcpStream::connect(tg.proxy_addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
}

#[tokio::test]
async fn an_http2_client_earns_its_slot_with_preface_and_settings() {
    let (_up, tg) = proxy_with("  header_read_timeout: 300ms\n  idle_timeout: 60s\n").await;
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&frame(SETTINGS, 0, 0, &[]));
    assert_eq!(
        closed_after(tg.proxy_addr, &hello, Duration::from_secs(1)).await,
        None,
        "a complete HTTP/2 preface and SETTINGS earn the slot"
    );
}

/// Reads frames until a GOAWAY arrives, answering the server's PINGs and sending PINGs of its
/// own every 100 ms; returns when the GOAWAY came.
async fn ping_until_goaway(addr: SocketAddr, give_up: Duration) -> Option<Duration> {
    ping_until_closed(addr, give_up, false).await.map(|(goaway, _)| goaway)
}

/// [`ping_until_goaway`], then (with `to_the_end`) on until the server closes the connection:
/// when the GOAWAY came, and when the connection closed (the same without `to_the_end`).
async fn ping_until_closed(
    addr: SocketAddr,
    give_up: Duration,
    to_the_end: bool,
) -> Option<(Duration, Duration)> {
    let mut goaway = None;
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&frame(SETTINGS, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < give_up {
        tokio::select! {
            _ = tick.tick() => {
                if s.write_all(&frame(PING, 0, 0, b"keepaliv")).await.is_err() {
                    return None;
                }
            }
            n = s.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    return goaway.map(|g| (g, started.elapsed()));
                }
                pending.extend_from_slice(&buf[..n]);
                while pending.len() >= 9 {
                    let len = usize::from(pending[0]) << 16 | usize::from(pending[1]) << 8 | usize::from(pending[2]);
                    if pending.len() < 9 + len {
                        break;
                    }
                    let (kind, flags) = (pending[3], pending[4]);
                    let payload = pending[9..9 + len].to_vec();
                    pending.drain(..9 + len);
                    match kind {
                        GOAWAY if !to_the_end => return Some((started.elapsed(), started.elapsed())),
                        GOAWAY => goaway = goaway.or(Some(started.elapsed())),
                        PING if flags & 1 == 0 => {
                            let _ = s.write_all(&frame(PING, 1, 0, &payload)).await;
                        }
                        SETTINGS if flags & 1 == 0 => {
                            let _ = s.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    None
}

#[tokio::test]
async fn an_http2_connection_without_streams_gets_goaway_after_the_idle_timeout_despite_pings() {
    let (_up, tg) = proxy_with("  header_read_timeout: 2s\n  idle_timeout: 600ms\n").await;
    let goaway = ping_until_goaway(tg.proxy_addr, Duration::from_secs(5))
        .await
        .expect("an HTTP/2 connection with no open stream was kept open by PINGs");
    assert!(goaway >= Duration::from_millis(500), "closed before the idle timeout: {goaway:?}");
    assert_eq!(closed_count(&metrics(&tg).await, "proxy", "idle"), 1);
}

/// The idle clock runs from the end of the last request, exactly: a connection whose client
/// acknowledges PINGs gets its GOAWAY at `idle_timeout` and is closed right after.
#[tokio::test]
async fn an_idle_http2_connection_closes_at_the_idle_timeout_not_later() {
    let (_up, tg) = proxy_with("  idle_timeout: 3s\n").await;
    let (goaway, closed) = ping_until_closed(tg.proxy_addr, Duration::from_secs(10), true)
        .await
        .expect("an HTTP/2 connection with no open stream was kept open by PINGs");
    assert!(goaway >= Duration::from_millis(2900), "GOAWAY before the idle timeout: {goaway:?}");
    assert!(goaway < Duration::from_millis(3500), "GOAWAY only after {goaway:?}");
    assert!(closed < goaway + Duration::from_secs(1), "closed {:?} after the GOAWAY", closed - goaway);
}

/// HTTP/1.1 keep-alive: the wait for the next request is `idle_timeout`'s; `header_read_timeout`
/// starts at the next head's first byte. Clients that reuse pooled connections must not race a
/// close after `header_read_timeout`.
#[tokio::test]
async fn a_keep_alive_connection_waits_idle_timeout_for_its_next_request_and_header_timeout_for_its_head() {
    let (_up, tg) = proxy_with("  header_read_timeout: 400ms\n  idle_timeout: 3s\n").await;
    let request = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut buf = [0u8; 4096];
    let mut s = TcpStream::connect(tg.proxy_addr).await.unwrap();
    for pause in [Duration::ZERO, Duration::from_millis(1500), Duration::from_millis(1500)] {
        tokio::time::sleep(pause).await;
        s.write_all(request).await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "after {pause:?} idle: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    // A head that begins and stalls is closed after header_read_timeout.
    let started = Instant::now();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: loc").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("the stalled head was kept");
    assert!(matches!(n, Ok(0) | Err(_)), "{:?}", n.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()));
    assert!(started.elapsed() < Duration::from_millis(1000), "closed after {:?}", started.elapsed());
    // An idle one is closed at idle_timeout.
    let mut s = TcpStream::connect(tg.proxy_addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let _ = s.read(&mut buf).await.unwrap();
    let idle = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await.expect("never closed");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        idle.elapsed() >= Duration::from_millis(2900) && idle.elapsed() < Duration::from_millis(3600),
        "{:?}",
        idle.elapsed()
    );
    let m = metrics(&tg).await;
    assert_eq!(
        (closed_count(&m, "proxy", "header_timeout"), closed_count(&m, "proxy", "idle")),
        (1, 1),
        "{m}"
    );
}

#[tokio::test]
async fn a_streaming_response_is_not_idle() {
    // The upstream sends its body slowly: the request is in flight until the last byte.
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n").await;
                for b in b"abcdef" {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let _ = s.write_all(&[*b]).await;
                }
            });
        }
    });
    let idp = Idp::start(IdpOptions::default()).await;
    let tg =
        start(&format!("limits:\n  idle_timeout: 300ms\n{}", idp.config_to(&format!("http://{addr}")))).await;
    let body =
        client().get(format!("http://{}/slow", tg.proxy_addr)).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "abcdef");
}

#[tokio::test]
async fn at_the_connection_limit_the_oldest_idle_connection_makes_room() {
    let (up, tg) =
        proxy_with("  header_read_timeout: 30s\n  idle_timeout: 60s\n  max_connections: 4\n").await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(tg.proxy_addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        client().get(format!("http://{}/x", tg.proxy_addr)).send(),
    )
    .await
    .expect("a normal request got no answer while silent sockets held every slot")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The oldest silent socket was the one closed.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), silent[0].read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "the oldest idle connection is still open");
    assert!(closed_count(&metrics(&tg).await, "proxy", "evicted") >= 1);
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn a_connection_with_a_request_in_flight_is_never_evicted() {
    let idp = Idp::start(IdpOptions::default()).await;
    let slow = Upstream::start_with(None, Duration::from_millis(800)).await;
    let tg = start(&format!(
        "limits:\n  header_read_timeout: 30s\n  max_connections: 2\n{}",
        idp.config_to(&slow.url())
    ))
    .await;
    let url = format!("http://{}/busy", tg.proxy_addr);
    let busy = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _silent = TcpStream::connect(tg.proxy_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The newcomer evicts the silent connection, not the one waiting for its response.
    let r = client().get(format!("http://{}/next", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(busy.await.unwrap().unwrap(), 200, "a busy connection was closed");
}

#[tokio::test]
async fn healthz_answers_while_the_admin_port_is_flooded_with_silent_sockets() {
    let (_up, tg) = proxy_with("  header_read_timeout: 30s\n  idle_timeout: 60s\n").await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(tg.admin_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client().get(format!("http://{}/healthz", tg.admin_addr)).send(),
        )
        .await
        .expect("/healthz got no answer while the admin port was flooded")
        .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn the_tls_handshake_counts_against_the_first_request_deadline() {
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert_file: {}\n  key_file: {}\nlimits:\n  header_read_timeout: 300ms\n{}",
        pki.server_cert.display(),
        pki.server_key.display(),
        idp.config_to(&up.url())
    ))
    .await;
    let addr = tg.tls_addr.unwrap();
    for bytes in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let closed = closed_after(addr, bytes, Duration::from_secs(5)).await.expect("held open");
        assert!(closed < Duration::from_secs(2), "{closed:?}");
    }
}

/// An upstream that answers `GET /big` with 32 MiB (more than the socket buffers on both sides
/// hold, so a client that reads nothing leaves tokengate with data it cannot deliver) and
/// anything else with 2 bytes.
async fn big_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let big = got.starts_with(b"GET /big");
                    let len = if big { 32 << 20 } else { 2 };
                    if s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                }
            });
        }
    });
    addr
}

/// tokengate with one connection to [`big_upstream`] and a 1 s send timeout.
async fn one_upstream_connection_with_send_timeout() -> tokengate::server::Running {
    let addr = big_upstream().await;
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&format!(
        "limits:\n  send_timeout: 1s\n  upstream_max_connections: 1\n  upstream_queue_timeout: 5s\n{}",
        idp.config_to(&format!("http://{addr}"))
    ))
    .await;
    wait_ready(&tg).await;
    tg
}

/// A normal request gets the one upstream connection within 3 s: the stalled client was closed
/// for its send timeout, which freed it.
async fn the_upstream_connection_comes_free(tg: &tokengate::server::Running) {
    let started = Instant::now();
    let r = client().get(format!("http://{}/small", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());
    assert_eq!(closed_count(&metrics(tg).await, "proxy", "send_timeout"), 1);
}

#[tokio::test]
async fn a_client_that_takes_no_response_data_is_closed_and_frees_the_upstream_connection() {
    let tg = one_upstream_connection_with_send_timeout().await;
    let mut slow = TcpStream::connect(tg.proxy_addr).await.unwrap();
    slow.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    // It reads nothing. The one upstream connection is held by its response until tokengate
    // gives up on it; then a normal request gets the connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    the_upstream_connection_comes_free(&tg).await;
    // A client that reads slowly but steadily (10 MB/s, so that the kernel, which wakes a writer
    // only once a third of its send buffer is free, wakes tokengate well within the timeout) is
    // not cut off.
    let mut steady = TcpStream::connect(tg.proxy_addr).await.unwrap();
    steady.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 512 * 1024];
    while total < (32 << 20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match steady.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(total >= 32 << 20, "a steady reader was cut off after {total} bytes");
    assert_eq!(closed_count(&metrics(&tg).await, "proxy", "send_timeout"), 1);
}

#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_is_closed_too() {
    let tg = one_upstream_connection_with_send_timeout().await;
    // A raw HTTP/2 client that takes the response head and then never reads the body, so its
    // flow-control window (64 KiB) stays closed.
    let tcp = TcpStream::connect(tg.proxy_addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/big", tg.proxy_addr)).body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let _unread = resp.into_body();
    the_upstream_connection_comes_free(&tg).await;
}
