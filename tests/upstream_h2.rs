//! HTTPS upstreams and the protocol ALPN settles on: HTTP/2 when the upstream offers it (the
//! default, `upstream_protocol: auto`), HTTP/1.1 when it does not or when the route says
//! `http1`. The HTTP/2 upstream here is the `h2` crate's server driven frame by frame, so stream
//! limits, refused and reset streams, GOAWAY and oversized heads are chosen by the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// What the HTTP/2 upstream does with one request (numbered from 0 across connections).
#[derive(Clone)]
enum Act {
    /// 200 with this body after this pause.
    Answer(&'static str, Duration),
    /// RST_STREAM with this error code.
    Reset(h2::Reason),
    /// Answer, then GOAWAY: the connection takes no new streams.
    AnswerThenGoAway,
    /// 200 with a header longer than any sane limit.
    HugeHead,
    /// 200 with `Content-Length: n` and n bytes (none for HEAD), sent as the window allows.
    Sized(usize),
}

type Script = Arc<dyn Fn(usize, &http::Request<h2::RecvStream>) -> Act + Send + Sync>;

/// A request as the HTTP/2 upstream saw it.
#[derive(Debug, Clone)]
struct Got {
    method: String,
    uri: String,
    authorization: Option<String>,
    body_len: usize,
    connection: usize,
    headers: http::HeaderMap,
}

struct H2Upstream {
    addr: SocketAddr,
    pki: Pki,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Got>>>,
    // Streams being answered at once, and the most there ever were.
    peak: Arc<AtomicUsize>,
    // Connections the client closed.
    closed: Arc<AtomicUsize>,
    // Set: new connections are closed at once, before TLS.
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

impl H2Upstream {
    /// Offers only `h2` by ALPN; each connection takes at most `streams` streams at once.
    async fn start(
        streams: u32,
        script: impl Fn(usize, &http::Request<h2::RecvStream>) -> Act + Send + Sync + 'static,
    ) -> Self {
        Self::start_with(streams, 65_535, script).await
    }

    /// [`H2Upstream::start`] with a stream flow-control window of `window` bytes.
    async fn start_with(
        streams: u32,
        window: u32,
        script: impl Fn(usize, &http::Request<h2::RecvStream>) -> Act + Send + Sync + 'static,
    ) -> Self {
        let script: Script = Arc::new(script);
        let pki = pki();
        let mut config =
            tokengate::tls::server_config(&pki.server_cert, &pki.server_key, None, false).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, requests, peak) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
        let closed = Arc::new(AtomicUsize::new(0));
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refusing = refuse.clone();
        let (c, r, p, d) = (connections.clone(), requests.clone(), peak.clone(), closed.clone());
        let numbered = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    drop(tcp);
                    continue;
                }
                let index = c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, script, r, p, d) =
                    (acceptor.clone(), script.clone(), r.clone(), p.clone(), d.clone());
                let (numbered, active) = (numbered.clone(), active.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut conn) = h2::server::Builder::new()
                        .max_concurrent_streams(streams)
                        .initial_window_size(window)
                        .handshake::<_, Bytes>(tls)
                        .await
                    else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        let n = numbered.fetch_add(1, Ordering::SeqCst);
                        let act = script(n, &req);
                        if matches!(act, Act::AnswerThenGoAway) {
                            conn.graceful_shutdown();
                        }
                        let (r, p, active) = (r.clone(), p.clone(), active.clone());
                        tokio::spawn(serve_stream(req, respond, act, index, r, p, active));
                    }
                    d.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        H2Upstream { addr, pki, connections, requests, peak, closed, refuse }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Got> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    act: Act,
    connection: usize,
    requests: Arc<Mutex<Vec<Got>>>,
    peak: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
) {
    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
    peak.fetch_max(now, Ordering::SeqCst);
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0;
    if !matches!(act, Act::Reset(_)) {
        while let Some(Ok(chunk)) = body.data().await {
            body_len += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    }
    requests.lock().unwrap().push(Got {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        authorization: parts.headers.get("authorization").map(|v| v.to_str().unwrap().to_owned()),
        body_len,
        connection,
        headers: parts.headers.clone(),
    });
    let answer = |body: &'static str, respond: &mut h2::server::SendResponse<Bytes>, huge: bool| {
        let mut resp = http::Response::builder().status(200).header("content-length", body.len());
        if huge {
            resp = resp.header("x-huge", "h".repeat(200 * 1024));
        }
        if let Ok(mut send) = respond.send_response(resp.body(()).unwrap(), false) {
            let _ = send.send_data(Bytes::from_static(body.as_bytes()), true);
        }
    };
    match act {
        Act::Answer(body, pause) => {
            tokio::time::sleep(pause).await;
            answer(body, &mut respond, false);
        }
        Act::Reset(reason) => respond.send_reset(reason),
        Act::AnswerThenGoAway => answer("last on this connection", &mut respond, false),
        Act::HugeHead => answer("huge", &mut respond, true),
        Act::Sized(n) => {
            let resp = http::Response::builder().status(200).header("content-length", n).body(()).unwrap();
            let head = parts.method == http::Method::HEAD;
            if let Ok(mut send) = respond.send_response(resp, head) {
                let mut left = if head { 0 } else { n };
                while left > 0 {
                    send.reserve_capacity(left.min(64 * 1024));
                    let Some(Ok(granted)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else {
                        break;
                    };
                    let piece = granted.min(left);
                    let _ = send.send_data(Bytes::from(vec![b'z'; piece]), piece == left);
                    left -= piece;
                }
            }
        }
    }
    active.fetch_sub(1, Ordering::SeqCst);
}

async fn proxy_to(addr: SocketAddr, ca: &std::path::Path, extra: &str) -> (Idp, tokengate::server::Running) {
    proxy_with(addr, ca, "", extra).await
}

async fn proxy_with(
    addr: SocketAddr,
    ca: &std::path::Path,
    top: &str,
    extra: &str,
) -> (Idp, tokengate::server::Running) {
    let idp = Idp::start(IdpOptions::default()).await;
    let config = format!(
        "{top}{}routes:\n  - prefix: /\n    upstream: https://127.0.0.1:{}\n    provider: idp\n    ca_file: {}\n{extra}",
        idp.provider_yaml(),
        addr.port(),
        ca.display()
    );
    let tg = start(&config).await;
    wait_ready(&tg).await;
    (idp, tg)
}

async fn fetch(tg: &tokengate::server::Running, method: &str, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", tg.proxy_addr);
    let r = client().request(method.parse().unwrap(), url).body("payload").send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The statuses of `n` GETs to `path` sent at the same time, each on its own connection.
async fn at_once(tg: &tokengate::server::Running, path: &str, n: usize) -> Vec<u16> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("http://{}{path}{i}", tg.proxy_addr);
            tokio::spawn(async move { fresh_client().get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses
}

#[tokio::test]
async fn the_upstream_chooses_http2_or_http11_by_alpn() {
    let pki = pki();
    let cases: [(&[&[u8]], &str, http::Version); 4] = [
        (&[b"h2", b"http/1.1"], "", http::Version::HTTP_2),
        (&[b"http/1.1"], "", http::Version::HTTP_11),
        (&[b"h2", b"http/1.1"], "    upstream_protocol: http1\n", http::Version::HTTP_11),
        // No ALPN at all: HTTP/1.1, as RFC 7301 says a client must assume.
        (&[], "", http::Version::HTTP_11),
    ];
    for (alpn, extra, expected) in cases {
        let (addr, seen, handshakes) = tls_upstream_offering(&pki.server_cert, &pki.server_key, alpn).await;
        let (_idp, tg) = proxy_to(addr, &pki.ca, extra).await;
        for n in 0..10 {
            assert_eq!(fetch(&tg, if n % 2 == 0 { "GET" } else { "POST" }, "/v").await.0, 200);
        }
        let seen = seen.lock().unwrap().clone();
        let versions: Vec<_> = seen.iter().map(|r| r.version).collect();
        assert_eq!(versions, vec![expected; 10], "offered {alpn:?} with {extra:?}");
        assert!(
            seen.iter().all(|r| r.header("authorization").is_some_and(|a| a.starts_with("Bearer "))),
            "every request carried the token ({alpn:?} {extra:?})"
        );
        assert_eq!(
            handshakes.load(Ordering::SeqCst),
            1,
            "one connection carries them all ({alpn:?} {extra:?})"
        );
        tg.shutdown().await;
    }
}

#[tokio::test]
async fn http2_requests_carry_the_token_and_the_upstream_authority() {
    let up = H2Upstream::start(100, |_, _| Act::Answer("fine", Duration::ZERO)).await;
    let (idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    let r = client()
        .post(format!("http://{}/a/b?q=1", tg.proxy_addr))
        .header("authorization", "Basic Y2xpZW50OnNlY3JldA==")
        .body(vec![7u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "fine");
    let got = &up.requests()[0];
    assert_eq!(got.uri, format!("https://127.0.0.1:{}/a/b?q=1", up.addr.port()));
    assert_eq!(got.method, "POST");
    assert_eq!(got.body_len, 5000);
    let authorization = got.authorization.as_deref().unwrap();
    assert!(idp.valid(authorization), "the client's Authorization was replaced by the provider's token");
    tg.shutdown().await;
}

#[tokio::test]
async fn buffered_bodies_wait_for_a_small_upstream_window() {
    // 1,000-byte windows: a 60 KiB body held in memory goes out as the upstream reads it.
    let up = H2Upstream::start_with(100, 1000, |_, _| Act::Answer("got it", Duration::ZERO)).await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    assert_eq!(fetch(&tg, "GET", "/warm").await.0, 200);
    for _ in 0..3 {
        let r = client()
            .post(format!("http://{}/put", tg.proxy_addr))
            .body(vec![1u8; 60 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "got it");
    }
    let got = up.requests();
    assert_eq!(got.len(), 4);
    assert!(got[1..].iter().all(|g| g.body_len == 60 * 1024), "{got:?}");
    tg.shutdown().await;
}

#[tokio::test]
async fn connection_specific_client_headers_never_reach_an_http2_upstream() {
    // RFC 9113 section 8.2.2: h2 refuses a request carrying any of them, so one left in would
    // turn every such request into a 502.
    let up = H2Upstream::start(100, |_, _| Act::Answer("clean", Duration::ZERO)).await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    assert_eq!(fetch(&tg, "GET", "/warm").await.0, 200);
    let answer = raw(
        tg.proxy_addr,
        b"GET /hop HTTP/1.1\r\nhost: localhost\r\nconnection: keep-alive, x-private\r\nkeep-alive: timeout=5\r\n\
          proxy-connection: keep-alive\r\nte: trailers, deflate\r\nupgrade: h2c\r\nx-private: 1\r\n\
          x-kept: 2\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = up.requests().pop().unwrap();
    for name in ["connection", "keep-alive", "proxy-connection", "upgrade", "transfer-encoding", "x-private"]
    {
        assert!(!got.headers.contains_key(name), "{name} reached the upstream");
    }
    assert_eq!(got.headers["te"], "trailers");
    assert_eq!(got.headers["x-kept"], "2");
    tg.shutdown().await;
}

#[tokio::test]
async fn streamed_uploads_go_over_http2_whole() {
    let up = H2Upstream::start(100, |_, _| Act::Answer("stored", Duration::ZERO)).await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    // Warm up, so the upstream is known to speak HTTP/2.
    assert_eq!(fetch(&tg, "GET", "/warm").await.0, 200);
    // Chunked, with no length: streamed rather than buffered.
    let mut wire =
        b"PUT /upload HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..64 {
        wire.extend_from_slice(format!("{:x}\r\n", 16 * 1024).as_bytes());
        wire.extend_from_slice(&[b'x'; 16 * 1024]);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(tg.proxy_addr, &wire).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("stored"), "{answer}");
    let got = up.requests();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].body_len, 64 * 16 * 1024);
    assert_eq!(up.connections(), 1, "the upload shared the connection");
    tg.shutdown().await;
}

#[tokio::test]
async fn http2_bodies_keep_their_length_past_the_flow_control_window() {
    let up = H2Upstream::start(100, |_, req| match req.uri().path() {
        "/big" => Act::Sized(3 * 1024 * 1024),
        _ => Act::Sized(3),
    })
    .await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    // Larger than the 2 MiB stream window: the window must open again as the client reads.
    let r = client().get(format!("http://{}/big", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "3145728", "the length is passed on, not re-chunked");
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), 3 * 1024 * 1024);
    assert!(body.iter().all(|b| *b == b'z'));
    // A HEAD answer announces a length and carries no body.
    let r = client().head(format!("http://{}/small", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "3");
    assert!(r.bytes().await.unwrap().is_empty());
    let r = client().get(format!("http://{}/small", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"zzz");
    assert_eq!(up.connections(), 1);
    tg.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_idle_timeout() {
    let up = H2Upstream::start(100, |_, _| Act::Answer("ok", Duration::ZERO)).await;
    let (_idp, tg) = proxy_with(up.addr, &up.pki.ca, "limits:\n  upstream_idle_timeout: 300ms\n", "").await;
    assert_eq!(fetch(&tg, "GET", "/1").await.0, 200);
    assert_eq!(fetch(&tg, "GET", "/2").await.0, 200);
    assert_eq!(up.connections(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The next request finds the connection past its idle time: it is closed, a new one opened.
    assert_eq!(fetch(&tg, "GET", "/3").await.0, 200);
    assert_eq!(up.connections(), 2);
    for _ in 0..50 {
        if up.closed.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.closed.load(Ordering::SeqCst), 1, "the idle connection was closed by tokengate");
    tg.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_without_a_request_to_notice() {
    let up = H2Upstream::start(100, |_, _| Act::Answer("ok", Duration::from_millis(400))).await;
    let (_idp, tg) = proxy_with(up.addr, &up.pki.ca, "limits:\n  upstream_idle_timeout: 300ms\n", "").await;
    // A response slower than the idle timeout: the connection is busy, not idle, meanwhile.
    assert_eq!(fetch(&tg, "GET", "/slow").await.0, 200);
    assert_eq!(up.closed.load(Ordering::SeqCst), 0, "a busy connection is not idle");
    let idle_from = std::time::Instant::now();
    // No request follows; the connection's own timer lets it go.
    while up.closed.load(Ordering::SeqCst) == 0 && idle_from.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = idle_from.elapsed();
    assert_eq!(up.closed.load(Ordering::SeqCst), 1, "the idle connection was closed by tokengate");
    assert!(waited >= Duration::from_millis(200), "closed before it was idle for the timeout ({waited:?})");
    assert_eq!(up.connections(), 1);
    // The next request opens a new one and is served.
    assert_eq!(fetch(&tg, "GET", "/again").await.0, 200);
    assert_eq!(up.connections(), 2);
    tg.shutdown().await;
}

#[tokio::test]
async fn a_burst_after_goaway_waits_for_one_new_connection() {
    let up = H2Upstream::start(100, |_, req| match req.uri().path() {
        "/last" => Act::AnswerThenGoAway,
        _ => Act::Answer("ok", Duration::from_millis(20)),
    })
    .await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    assert_eq!(fetch(&tg, "GET", "/last").await.0, 200);
    // The connection is gone; twenty requests at once then share the one that replaces it
    // instead of each making a TLS handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(at_once(&tg, "/b", 20).await, vec![200; 20]);
    assert_eq!(up.requests().len(), 21);
    assert_eq!(up.connections(), 2, "one connection replaced the closed one");
    tg.shutdown().await;
}

#[tokio::test]
async fn requests_waiting_for_a_connection_that_fails_get_a_502_at_once() {
    // Refused connections: every request waiting for the worker's attempt gets a JSON 502 naming
    // the upstream as unreachable, none waits for a timeout.
    let up = H2Upstream::start(100, |_, _| Act::AnswerThenGoAway).await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    assert_eq!(fetch(&tg, "GET", "/warm").await.0, 200);
    up.refuse.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls: Vec<_> = (0..10)
        .map(|n| {
            let url = format!("http://{}/f{n}", tg.proxy_addr);
            tokio::spawn(async move {
                let r = fresh_client().get(url).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    for c in calls {
        let (status, body) = tokio::time::timeout(Duration::from_secs(5), c).await.unwrap().unwrap();
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("upstream_unreachable"), "{body}");
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn past_the_upstreams_stream_limit_more_connections_are_opened() {
    // One stream per connection, each answer taking a while: four requests at once only run
    // together on four connections.
    let up = H2Upstream::start(1, |_, _| Act::Answer("slow", Duration::from_millis(500))).await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    assert_eq!(fetch(&tg, "GET", "/warm").await.0, 200);
    assert_eq!(at_once(&tg, "/c", 4).await, vec![200; 4]);
    assert_eq!(up.peak.load(Ordering::SeqCst), 4, "the four requests were answered at the same time");
    assert!(up.connections() >= 4, "{} connections", up.connections());
    tg.shutdown().await;
}

#[tokio::test]
async fn refused_streams_and_goaway_are_sent_again_on_a_new_connection() {
    // Request 1 is refused (RFC 9113 section 8.7: not processed, safe to send again whatever the
    // method); request 3 is the last its connection takes.
    let up = H2Upstream::start(100, |n, req| match (n, req.uri().path()) {
        (1, _) => Act::Reset(h2::Reason::REFUSED_STREAM),
        (_, "/3") => Act::AnswerThenGoAway,
        _ => Act::Answer("ok", Duration::ZERO),
    })
    .await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    for path in ["/0", "/1", "/2", "/3", "/4", "/5"] {
        let (status, body) = fetch(&tg, "POST", path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let uris: Vec<String> =
        up.requests().iter().map(|g| g.uri.rsplit('/').next().unwrap().to_owned()).collect();
    assert_eq!(uris, ["0", "1", "1", "2", "3", "4", "5"], "only the refused POST went twice");
    let got = up.requests();
    assert_ne!(got[1].connection, got[2].connection, "sent again on a new connection");
    assert_ne!(got[4].connection, got[5].connection, "after GOAWAY, a new connection");
    tg.shutdown().await;
}

#[tokio::test]
async fn a_reset_stream_is_sent_again_only_when_idempotent() {
    let up = H2Upstream::start(100, |_, req| {
        if req.uri().path().ends_with("/first") {
            Act::Reset(h2::Reason::INTERNAL_ERROR)
        } else {
            Act::Answer("ok", Duration::ZERO)
        }
    })
    .await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    assert_eq!(fetch(&tg, "GET", "/warm").await.0, 200);
    // Every request to */first is reset: a GET is tried twice, then answered 502; a POST once.
    let (status, body) = fetch(&tg, "GET", "/get/first").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream"), "{body}");
    let (status, body) = fetch(&tg, "POST", "/post/first").await;
    assert_eq!(status, 502, "{body}");
    let count = |p: &str| up.requests().iter().filter(|g| g.uri.ends_with(p)).count();
    assert_eq!(count("/get/first"), 2, "an idempotent request is sent once more");
    assert_eq!(count("/post/first"), 1, "a POST that may have been acted on is not sent twice");
    // The connection is still good for others.
    assert_eq!(fetch(&tg, "GET", "/after").await.0, 200);
    tg.shutdown().await;
}

#[tokio::test]
async fn broken_http2_upstreams_get_a_json_502_and_nothing_hangs() {
    // A response head beyond the header limit.
    let up = H2Upstream::start(100, |_, req| {
        if req.uri().path() == "/huge" { Act::HugeHead } else { Act::Answer("ok", Duration::ZERO) }
    })
    .await;
    let (_idp, tg) = proxy_to(up.addr, &up.pki.ca, "").await;
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(10), fetch(&tg, "GET", "/huge")).await.unwrap();
    assert_eq!(status, 502, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("upstream"), "{body}");
    assert_eq!(fetch(&tg, "GET", "/fine").await.0, 200, "other requests go on");

    // An upstream that chooses h2 by ALPN and then answers in HTTP/1.1.
    let pki = pki();
    let mut config = tokengate::tls::server_config(&pki.server_cert, &pki.server_key, None, false).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            });
        }
    });
    let (_idp2, tg2) = proxy_to(addr, &pki.ca, "").await;
    for method in ["GET", "POST"] {
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(10), fetch(&tg2, method, "/x")).await.unwrap();
        assert_eq!(status, 502, "{body}");
    }
    tg.shutdown().await;
    tg2.shutdown().await;
}
