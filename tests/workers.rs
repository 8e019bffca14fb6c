//! Serving on worker threads (`tokengate run --workers N`): each thread has its own event loop
//! and its own socket on the listening port; the connection limit and graceful shutdown still
//! hold for the process as a whole.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::*;
use tokengate::server::{Running, Workers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_threads(yaml: &str, threads: usize) -> Running {
    let text = format!("listen: {ANY}\nadmin:\n  listen: {ANY}\n{yaml}");
    let config = tokengate::config::parse(&text, "test.yaml").unwrap();
    let workers = Workers::Threads(NonZeroUsize::new(threads).unwrap());
    tokengate::server::start_with(config, None, workers).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_served_and_shutdown_drains_all_workers() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start_with(None, Duration::from_millis(300)).await;
    let tg = start_threads(&idp.config_to(&up.url()), 4).await;
    wait_ready(&tg).await;

    // Separate clients, separate connections: the kernel spreads them over the four sockets.
    let mut clients = Vec::new();
    for n in 0..32 {
        let url = format!("http://{}/c{n}", tg.proxy_addr);
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            for _ in 0..2 {
                statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
            }
            statuses
        }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), [200, 200]);
    }
    assert_eq!(up.requests().len(), 64);
    assert!(
        up.requests().iter().all(|r| r.header("authorization").is_some_and(|a| a.starts_with("Bearer ")))
    );

    // Requests in flight on any worker finish; then the port is closed.
    let addr = tg.proxy_addr;
    let in_flight: Vec<_> = (0..8)
        .map(|n| tokio::spawn(async move { client().get(format!("http://{addr}/slow{n}")).send().await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tg.shutdown().await;
    for r in in_flight {
        assert_eq!(r.await.unwrap().unwrap().status(), 200);
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no worker listens after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_across_workers() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start_with(None, Duration::from_millis(600)).await;
    let yaml = format!("limits:\n  max_connections: 3\n{}", idp.config_to(&up.url()));
    let tg = start_threads(&yaml, 2).await;
    wait_ready(&tg).await;

    // Six keep-alive connections each send a slow request: only the limit's worth are in flight.
    let request = format!("GET /x HTTP/1.1\r\nhost: {}\r\n\r\n", tg.proxy_addr);
    let mut reads = Vec::new();
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        reads.push(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let ok = matches!(got, Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200"));
            (ok, s)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.requests().len(), 3, "requests in flight with a limit of 3");

    // Once the first three are answered their connections are idle, and each waiting
    // connection takes the slot of the oldest idle one.
    let mut open = Vec::new();
    for r in reads {
        let (ok, s) = r.await.unwrap();
        assert!(ok, "a waiting connection was not served");
        open.push(s);
    }
    assert_eq!(up.requests().len(), 6);
    let m =
        client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains(r#"tokengate_connections_closed_total{listener="proxy",reason="evicted"} 3"#), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_and_http2_clients_work_on_worker_threads() {
    // By default (`auto`) HTTP/2, which this upstream offers by ALPN, on each worker's own
    // connections; `http1` keeps to HTTP/1.1 on the lean keep-alive connections.
    for (protocol, expected) in
        [("", http::Version::HTTP_2), ("    upstream_protocol: http1\n", http::Version::HTTP_11)]
    {
        https_upstream_on_workers(protocol, expected).await;
    }
}

async fn https_upstream_on_workers(protocol: &str, expected: http::Version) {
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let (addr, seen, handshakes) = tls_upstream_counted(&pki.server_cert, &pki.server_key).await;
    let yaml = format!(
        "{}routes:\n  - prefix: /\n    upstream: https://127.0.0.1:{}\n    provider: idp\n    ca_file: {}\n{protocol}",
        idp.provider_yaml(),
        addr.port(),
        pki.ca.display()
    );
    let tg = start_threads(&yaml, 2).await;
    wait_ready(&tg).await;
    let mut calls = Vec::new();
    for n in 0..16 {
        let url = format!("http://{}/h{n}", tg.proxy_addr);
        calls.push(tokio::spawn(async move {
            // Separate HTTP/2 (prior knowledge) connections, spread over both workers.
            h2_client().get(url).send().await.unwrap().status().as_u16()
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 16);
    assert!(seen.iter().all(|r| r.version == expected && r.header("authorization").is_some()), "{protocol}");
    // Connections are kept alive: more requests, one at a time, open no new ones. hyper's pool
    // may still be finishing handshakes it started for the burst: count once that settles.
    let mut opened = handshakes.load(std::sync::atomic::Ordering::SeqCst);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = handshakes.load(std::sync::atomic::Ordering::SeqCst);
        if now == opened {
            break;
        }
        opened = now;
    }
    let c = client();
    for n in 0..10 {
        assert_eq!(c.get(format!("http://{}/again{n}", tg.proxy_addr)).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        opened,
        "{protocol}: upstream connections not reused"
    );
    assert!(opened <= 16, "{opened} handshakes for 16 requests");
    tg.shutdown().await;
}

/// Workers share the port with `SO_REUSEPORT`; another process must not join them. A second
/// `tokengate run` on the same proxy port (its own admin port) refuses to start, naming the
/// port, and every request keeps reaching the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_share_the_proxy_port() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let proxy = closed_port();
    let run = |dir: &std::path::Path, admin: std::net::SocketAddr, route: &str| {
        let path = dir.join("tokengate.yaml");
        let yaml = format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\naccess_log: off\n{}",
            idp.config_to(&up.url()).replace("prefix: /", &format!("prefix: /{route}"))
        );
        std::fs::write(&path, yaml).unwrap();
        Process::spawn_with(
            &path,
            admin,
            &["--workers", "2"],
            std::fs::File::create(dir.join("log")).unwrap().into(),
        )
    };
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = run(a_dir.path(), closed_port(), "first");
    first.ready().await;
    let mut second = run(b_dir.path(), closed_port(), "second");
    assert_eq!(
        second.exited_within(Duration::from_secs(10)).await,
        Some(Some(1)),
        "the second process started"
    );
    let log = std::fs::read_to_string(b_dir.path().join("log")).unwrap();
    assert!(log.contains(&proxy.to_string()) && log.contains("another process"), "{log}");
    for n in 0..20 {
        let r = fresh_client().get(format!("http://{proxy}/first/{n}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}
