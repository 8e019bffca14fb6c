//! The upstream side of the wire: keep-alive reuse, response framing and the connection
//! lifecycle, against a raw upstream that answers from a script, so every byte it sends is
//! chosen by the test. The lifecycle tests run over plain TCP and over TLS (the lean client
//! speaks HTTP/1.1 over both).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the scripted upstream does with one request.
enum Act {
    /// Write these bytes and keep the connection open.
    Answer(Vec<u8>),
    /// Write these bytes, then close.
    AnswerAndClose(Vec<u8>),
    /// Close without answering.
    Close,
}

type Script = Arc<dyn Fn(usize, &str) -> Act + Send + Sync>;

struct RawUpstream {
    addr: SocketAddr,
    /// Present when it speaks TLS.
    tls: Option<Pki>,
    connections: Arc<AtomicUsize>,
    /// Each request's head and body as received.
    requests: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start(script: impl Fn(usize, &str) -> Act + Send + Sync + 'static) -> Self {
        Self::start_on(false, script).await
    }

    /// Over TLS (a fresh test CA) when `tls` is set.
    async fn start_on(tls: bool, script: impl Fn(usize, &str) -> Act + Send + Sync + 'static) -> Self {
        let script: Script = Arc::new(script);
        let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let pki = tls.then(pki);
        let acceptor = pki.as_ref().map(|p| {
            let mut config =
                tokengate::tls::server_config(&p.server_cert, &p.server_key, None, false).unwrap();
            // A scripted HTTP/1.1 server: it must not accept h2 by ALPN.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (script, requests, acceptor) = (script.clone(), r.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_script(s, script, requests).await,
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                serve_script(s, script, requests).await;
                            }
                        }
                    }
                });
            }
        });
        RawUpstream { addr, tls: pki, connections, requests }
    }

    fn url(&self) -> String {
        match self.tls {
            None => format!("http://{}", self.addr),
            Some(_) => format!("https://{}", self.addr),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answers the requests of one connection from the script.
async fn serve_script<S>(mut s: S, script: Script, requests: Arc<Mutex<Vec<String>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut s, &mut buf).await {
        let n = {
            let mut seen = requests.lock().unwrap();
            seen.push(request.clone());
            seen.len()
        };
        match script(n, &request) {
            Act::Answer(bytes) => {
                if s.write_all(&bytes).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
            Act::AnswerAndClose(bytes) => {
                let _ = s.write_all(&bytes).await;
                // An orderly close (TLS: close_notify), as a keep-alive timeout does.
                let _ = s.shutdown().await;
                return;
            }
            // Abrupt: no close_notify over TLS.
            Act::Close => return,
        }
    }
}

/// One request (head and a Content-Length body) as text, or `None` at the end of the connection.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            while buf.len() < end + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            let request = String::from_utf8_lossy(&buf[..end + len]).into_owned();
            buf.drain(..end + len);
            return Some(request);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn ok(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

async fn proxy_to(up: &RawUpstream) -> (Idp, tokengate::server::Running) {
    let idp = Idp::start(IdpOptions::default()).await;
    let mut config = idp.config_to(&up.url());
    if let Some(pki) = &up.tls {
        config.push_str(&format!("    ca_file: {}\n", pki.ca.display()));
    }
    let tg = start(&config).await;
    (idp, tg)
}

async fn fetch(tg: &tokengate::server::Running, method: &str, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", tg.proxy_addr);
    let r = client().request(method.parse().unwrap(), url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    for tls in [false, true] {
        keep_alive_connections_are_reused_on(tls).await;
    }
}

async fn keep_alive_connections_are_reused_on(tls: bool) {
    let up = RawUpstream::start_on(tls, |n, _| Act::Answer(ok(&format!("answer {n}")))).await;
    let (_idp, tg) = proxy_to(&up).await;
    for n in 1..=20 {
        assert_eq!(fetch(&tg, "GET", "/a").await, (200, format!("answer {n}")));
        // Idle long enough for a TLS 1.3 session ticket to arrive between requests.
        if n == 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(up.connections(), 1, "sequential requests share one upstream connection (tls: {tls})");
    let first = &up.requests()[0];
    assert!(first.starts_with("GET /a HTTP/1.1\r\n"), "{first}");
    assert!(first.contains(&format!("host: {}\r\n", up.addr)), "{first}");
    assert!(first.contains("authorization: Bearer "), "{first}");
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    for tls in [false, true] {
        // Every answer is followed by a close, with no `Connection: close` to announce it, as
        // when a keep-alive timeout fires on the upstream between two requests.
        let up = RawUpstream::start_on(tls, |n, _| Act::AnswerAndClose(ok(&format!("answer {n}")))).await;
        let (_idp, tg) = proxy_to(&up).await;
        for n in 1..=3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(fetch(&tg, "POST", "/a").await, (200, format!("answer {n}")), "tls: {tls}");
        }
        assert_eq!(up.connections(), 3);
    }
}

#[tokio::test]
async fn a_request_met_by_a_closing_connection_is_retried_only_when_idempotent() {
    for tls in [false, true] {
        met_by_a_closing_connection(tls).await;
    }
}

async fn met_by_a_closing_connection(tls: bool) {
    // The second request on every connection finds it closing: the race between a keep-alive
    // timeout and a new request.
    let served = Arc::new(AtomicUsize::new(0));
    let s = served.clone();
    let racing = RawUpstream::start_on(tls, move |_, req| {
        // Requests alternate: answered, then met by a closing connection.
        if s.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            Act::Answer(ok(&format!("served {}", req.lines().next().unwrap_or_default())))
        } else {
            Act::Close
        }
    })
    .await;
    let (_idp, tg) = proxy_to(&racing).await;
    assert_eq!(fetch(&tg, "GET", "/1").await.0, 200);
    // Sent on the reused connection, which closes: replayed on a new one.
    assert_eq!(fetch(&tg, "GET", "/2").await.0, 200, "GET is retried on a fresh connection (tls: {tls})");
    assert_eq!(fetch(&tg, "GET", "/3").await.0, 200);
    let (status, body) = fetch(&tg, "POST", "/4").await;
    assert_eq!(status, 502, "a POST that may have been acted on is not sent twice: {body}");
    let posts = racing.requests().iter().filter(|r| r.starts_with("POST /4 ")).count();
    assert_eq!(posts, 1);
}

#[tokio::test]
async fn chunked_responses_are_decoded_and_the_connection_reused() {
    let big: String = (0..20_000).map(|i| format!("{i:08}\n")).collect();
    let big_wire: String = big
        .as_bytes()
        .chunks(1000)
        .map(|c| format!("{:x}\r\n{}\r\n", c.len(), String::from_utf8_lossy(c)))
        .collect();
    let wire = big_wire.clone();
    let up = RawUpstream::start(move |_, req| {
        let body = if req.starts_with("GET /big") {
            format!("{wire}0\r\n\r\n")
        } else if req.starts_with("GET /both") {
            // Transfer-Encoding wins; the stray length must not reach the client.
            return Act::Answer(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    .to_vec(),
            );
        } else {
            "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: dropped\r\n\r\n".to_owned()
        };
        Act::Answer(format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{body}").into_bytes())
    })
    .await;
    let (_idp, tg) = proxy_to(&up).await;
    assert_eq!(fetch(&tg, "GET", "/small").await, (200, "hello world".to_owned()));
    assert_eq!(fetch(&tg, "GET", "/both").await, (200, "hello".to_owned()));
    let (status, got) = fetch(&tg, "GET", "/big").await;
    assert_eq!(status, 200);
    assert_eq!(got.len(), big.len());
    assert!(got == big, "the body arrives byte for byte");
    let h2 = h2_client().get(format!("http://{}/small", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(h2.text().await.unwrap(), "hello world");
    // The response with both framings was not trusted to leave the connection clean.
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn a_body_that_runs_to_the_close_is_forwarded_whole() {
    let up = RawUpstream::start(|_, _| {
        Act::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec())
    })
    .await;
    let (_idp, tg) = proxy_to(&up).await;
    assert_eq!(fetch(&tg, "GET", "/a").await, (200, "until the end".to_owned()));
    assert_eq!(fetch(&tg, "GET", "/b").await, (200, "until the end".to_owned()));
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn ambiguous_framing_from_the_upstream_is_refused() {
    let up = RawUpstream::start(|_, req| {
        let answer = if req.starts_with("GET /two-lengths") {
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"
        } else if req.starts_with("GET /bad-length") {
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n"
        } else if req.starts_with("GET /switch") {
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
        } else {
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        };
        Act::AnswerAndClose(answer.as_bytes().to_vec())
    })
    .await;
    let (_idp, tg) = proxy_to(&up).await;
    for path in ["/two-lengths", "/bad-length", "/switch"] {
        let (status, body) = fetch(&tg, "GET", path).await;
        assert_eq!(status, 502, "{path}: {body}");
        assert!(body.contains("upstream_error"), "{path}: {body}");
    }
}

#[tokio::test]
async fn head_and_informational_answers_are_framed_right() {
    let up = RawUpstream::start(|_, req| {
        let answer = if req.starts_with("HEAD ") {
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_owned()
        } else if req.starts_with("GET /early") {
            "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                .to_owned()
        } else {
            String::from_utf8(ok("after")).unwrap()
        };
        Act::Answer(answer.into_bytes())
    })
    .await;
    let (_idp, tg) = proxy_to(&up).await;
    let r = client().head(format!("http://{}/h", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100");
    // Had tokengate waited for 100 body bytes after the HEAD, this would time out.
    assert_eq!(fetch(&tg, "GET", "/next").await, (200, "after".to_owned()));
    assert_eq!(fetch(&tg, "GET", "/early").await, (200, "ok".to_owned()));
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn request_bodies_go_with_their_own_length_and_hop_by_hop_headers_stay_behind() {
    let up = RawUpstream::start(|_, _| {
        Act::Answer(
            b"HTTP/1.1 200 OK\r\nconnection: x-internal\r\nx-internal: secret\r\nkeep-alive: timeout=5\r\nx-kept: 1\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        )
    })
    .await;
    let (_idp, tg) = proxy_to(&up).await;
    let r = client()
        .post(format!("http://{}/upload", tg.proxy_addr))
        .header("expect", "100-continue")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-kept"], "1");
    for gone in ["x-internal", "keep-alive"] {
        assert!(r.headers().get(gone).is_none(), "{gone} must not reach the client");
    }
    let seen = &up.requests()[0];
    assert!(seen.contains("content-length: 5\r\n"), "{seen}");
    assert!(seen.ends_with("\r\n\r\nhello"), "{seen}");
    assert!(!seen.to_lowercase().contains("expect:"), "{seen}");
}

#[tokio::test]
async fn a_large_buffered_body_is_sent_after_the_head() {
    let up = RawUpstream::start(|_, _| Act::Answer(ok("stored"))).await;
    let idp = Idp::start(IdpOptions::default()).await;
    // A replay buffer above the inline size: the body is kept, then written after the head.
    let yaml = format!("limits:\n  replay_buffer: 1MiB\n{}", idp.config_to(&format!("http://{}", up.addr)));
    let tg = start(&yaml).await;
    let body: Vec<u8> = (0..200 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let r = client().put(format!("http://{}/blob", tg.proxy_addr)).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = &up.requests()[0];
    assert!(seen.contains("content-length: 204800\r\n"), "{}", &seen[..seen.len().min(400)]);
    assert!(seen.as_bytes().ends_with(&body), "the upstream got the body byte for byte");
}
