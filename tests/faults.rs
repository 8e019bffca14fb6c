//! Fault injection over loopback: identity providers that fail, upstreams that reject tokens
//! or break, and a process that is stopped or reloaded while it serves.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// What the scripted IdP answers to the n-th (1-based) token request.
type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

#[derive(Clone)]
enum Reply {
    Token { lifetime: u64 },
    Status { status: u16, body: String, retry_after: Option<&'static str> },
    Slow(Duration),
}

#[derive(Clone)]
struct ScriptedIdp {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Instant>>>,
    issued: Arc<Mutex<HashSet<String>>>,
}

impl ScriptedIdp {
    async fn start_at(addr: SocketAddr, script: Script) -> ScriptedIdp {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let issued = Arc::new(Mutex::new(HashSet::new()));
        let (c, i) = (calls.clone(), issued.clone());
        let addr = tokengate::demo::serve_fn(addr, move |_req| {
            let (calls, issued, script) = (c.clone(), i.clone(), script.clone());
            async move {
                let n = {
                    let mut calls = calls.lock().unwrap();
                    calls.push(Instant::now());
                    calls.len()
                };
                match script(n) {
                    Reply::Token { lifetime } => {
                        let token = format!("tok-{n}");
                        issued.lock().unwrap().insert(token.clone());
                        json(200, serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime}))
                    }
                    Reply::Slow(d) => {
                        tokio::time::sleep(d).await;
                        json(200, serde_json::json!({"access_token": "late", "expires_in": 60}))
                    }
                    Reply::Status { status, body, retry_after } => {
                        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        if let Some(ra) = retry_after {
                            r.headers_mut().insert("retry-after", ra.parse().unwrap());
                        }
                        r
                    }
                }
            }
        })
        .await
        .unwrap();
        ScriptedIdp { addr, calls, issued }
    }

    async fn start(script: Script) -> ScriptedIdp {
        Self::start_at(any(), script).await
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

/// An upstream that answers 401 to tokens in `rejected`; with `reject_next` set, the next token
/// it sees is added to `rejected` (a token revoked behind tokengate's back).
#[derive(Clone)]
struct Guarded {
    up: Upstream,
    rejected: Arc<Mutex<HashSet<String>>>,
    reject_next: Arc<AtomicBool>,
}

async fn guarded_upstream(issued: Arc<Mutex<HashSet<String>>>) -> Guarded {
    let rejected = Arc::new(Mutex::new(HashSet::new()));
    let reject_next = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (r, n, s) = (rejected.clone(), reject_next.clone(), seen.clone());
    let addr = tokengate::demo::serve_fn(any(), move |req| {
        let (rejected, reject_next, seen, issued) = (r.clone(), n.clone(), s.clone(), issued.clone());
        async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let token = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .trim_start_matches("Bearer ")
                .to_owned();
            seen.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().into(),
                query: None,
                headers: parts.headers.clone(),
                body: body.clone(),
                version: parts.version,
            });
            if reject_next.swap(false, Ordering::SeqCst) {
                rejected.lock().unwrap().insert(token.clone());
            }
            if !issued.lock().unwrap().contains(&token) || rejected.lock().unwrap().contains(&token) {
                return json(401, serde_json::json!({"error": "invalid_token"}));
            }
            json(200, serde_json::json!({"token": token, "body_len": body.len()}))
        }
    })
    .await
    .unwrap();
    Guarded { up: Upstream { addr, seen }, rejected, reject_next }
}

fn config(idp: SocketAddr, up: &str, provider_extra: &str) -> String {
    format!(
        "providers:\n  p:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: c\n    client_secret: s\n{provider_extra}routes:\n  - prefix: /\n    upstream: {up}\n    provider: p\n"
    )
}

async fn get(tg: &tokengate::server::Running, path: &str) -> (u16, String) {
    let r = client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn metrics(tg: &tokengate::server::Running) -> String {
    client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn idp_down_at_start_answers_503_then_recovers() {
    let idp_addr = closed_port();
    let issued = Arc::new(Mutex::new(HashSet::new()));
    let up = guarded_upstream(issued.clone()).await;
    let tg = start(&config(idp_addr, &up.up.url(), "")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let (status, body) = get(&tg, "/x").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "503 must be quick, took {:?}",
        started.elapsed()
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["error"].as_str(), v["provider"].as_str()), (Some("token_unavailable"), Some("p")));
    // Retry-After says when the provider's next fetch is due: a whole number of seconds, at least 1.
    let r = client().get(format!("http://{}/y", tg.proxy_addr)).send().await.unwrap();
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    assert!(
        metrics(&tg).await.contains(r#"tokengate_token_fetches_total{provider="p",result="network_error"}"#)
    );
    let idp = ScriptedIdp::start_at(idp_addr, Arc::new(|_| Reply::Token { lifetime: 3600 })).await;
    *issued.lock().unwrap() = HashSet::from(["tok-1".to_string()]);
    let mut ok = false;
    for _ in 0..100 {
        if get(&tg, "/x").await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "no recovery after the IdP came up ({} calls)", idp.calls());
    assert!(up.up.requests().iter().all(|s| s.header("authorization").as_deref() == Some("Bearer tok-1")));
}

#[tokio::test]
async fn flapping_idp_under_steady_load_never_breaks_requests() {
    // Two of every three token requests fail with 503; tokens live 4 s.
    let idp = ScriptedIdp::start(Arc::new(|n| {
        if n % 3 == 0 {
            Reply::Token { lifetime: 4 }
        } else {
            Reply::Status { status: 503, body: "<html>down</html>".into(), retry_after: None }
        }
    }))
    .await;
    let up = guarded_upstream(idp.issued.clone()).await;
    let tg = start(&config(idp.addr, &up.up.url(), "")).await;
    wait_ready(&tg).await;
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (statuses, url) = (statuses.clone(), format!("http://{}/load", tg.proxy_addr));
        tasks.spawn(async move {
            let c = client();
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let s = c.get(&url).send().await.unwrap().status().as_u16();
                statuses.lock().unwrap().push(s);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let statuses = statuses.lock().unwrap();
    let bad: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {:?}",
        bad.len(),
        statuses.len(),
        &bad[..bad.len().min(10)]
    );
    assert!(idp.calls() >= 6, "expected at least two refresh cycles, saw {} calls", idp.calls());
}

#[tokio::test]
async fn slow_idp_hits_the_token_request_timeout() {
    let idp = ScriptedIdp::start(Arc::new(|_| Reply::Slow(Duration::from_secs(3)))).await;
    let tg = start(&config(idp.addr, "http://127.0.0.1:9", "    timeout: 300ms\n")).await;
    let started = Instant::now();
    let (status, _) = get(&tg, "/x").await;
    assert_eq!(status, 503);
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(metrics(&tg).await.contains(r#"tokengate_token_fetches_total{provider="p",result="timeout"}"#));
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let idp = ScriptedIdp::start(Arc::new(|n| {
        if n == 1 {
            Reply::Status { status: 429, body: r#"{"error":"slow_down"}"#.into(), retry_after: Some("2") }
        } else {
            Reply::Token { lifetime: 3600 }
        }
    }))
    .await;
    let up = guarded_upstream(idp.issued.clone()).await;
    let tg = start(&config(idp.addr, &up.up.url(), "")).await;
    // Requests in the meantime fail fast instead of calling the IdP again.
    for _ in 0..5 {
        assert_eq!(get(&tg, "/x").await.0, 503);
    }
    wait_ready(&tg).await;
    let calls = idp.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let gap = calls[1] - calls[0];
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}, before Retry-After");
    assert_eq!(get(&tg, "/x").await.0, 200);
}

#[tokio::test]
async fn malformed_token_responses_are_counted_and_nothing_is_forwarded() {
    let too_long = format!(r#"{{"access_token":"{}","expires_in":60}}"#, "a".repeat(40_000));
    for (status, body, label) in [
        (200, "<html><body>Login</body></html>", "malformed_response"),
        (200, r#"{"token_type":"Bearer","expires_in":60}"#, "malformed_response"),
        (200, r#"{"access_token":"x","token_type":"mac"}"#, "unsupported_token_type"),
        (200, "{not json", "malformed_response"),
        (200, too_long.as_str(), "malformed_response"),
        (502, "<html>Bad Gateway</html>", "http_502"),
    ] {
        let owned = body.to_owned();
        let idp = ScriptedIdp::start(Arc::new(move |_| Reply::Status {
            status,
            body: owned.clone(),
            retry_after: None,
        }))
        .await;
        let up = Upstream::start(None).await;
        let tg = start(&config(idp.addr, &up.url(), "")).await;
        let short = &body[..body.len().min(60)];
        assert_eq!(get(&tg, "/x").await.0, 503, "{short}");
        let m = metrics(&tg).await;
        assert!(
            m.contains(&format!(r#"tokengate_token_fetches_total{{provider="p",result="{label}"}}"#)),
            "{short}: {m}"
        );
        assert!(up.requests().is_empty(), "{short}: a request was forwarded without a token");
    }
}

async fn replay_setup() -> (ScriptedIdp, Guarded, tokengate::server::Running) {
    let idp = ScriptedIdp::start(Arc::new(|_| Reply::Token { lifetime: 3600 })).await;
    let up = guarded_upstream(idp.issued.clone()).await;
    let tg = start(&config(idp.addr, &up.up.url(), "")).await;
    wait_ready(&tg).await;
    (idp, up, tg)
}

#[tokio::test]
async fn upstream_401_on_get_refreshes_once_and_replays() {
    let (idp, up, tg) = replay_setup().await;
    up.reject_next.store(true, Ordering::SeqCst);
    let (status, body) = get(&tg, "/items?page=2").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tok-2"));
    assert_eq!(idp.calls(), 2);
    let seen = up.up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("authorization").as_deref(), Some("Bearer tok-1"));
    assert_eq!(seen[1].header("authorization").as_deref(), Some("Bearer tok-2"));
    assert!(metrics(&tg).await.contains(r#"tokengate_upstream_401_total{outcome="replayed",route="/"} 1"#));
}

#[tokio::test]
async fn upstream_401_on_small_post_replays_the_same_body() {
    let (idp, up, tg) = replay_setup().await;
    up.reject_next.store(true, Ordering::SeqCst);
    let r =
        client().post(format!("http://{}/orders", tg.proxy_addr)).body(r#"{"qty":3}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(idp.calls(), 2);
    let seen = up.up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(&seen[1].body[..], br#"{"qty":3}"#);
    assert_eq!(seen[1].method, "POST");
}

/// Clients that send small bodies chunked (Go with a reader, Node without a length, Java's
/// streaming mode) get the same replay as those that declare a length: a chunked body up to the
/// replay buffer, even an empty one, is replayed after a 401; a longer one streams and is not.
#[tokio::test]
async fn upstream_401_on_a_small_chunked_body_replays_it() {
    let (idp, up, tg) = replay_setup().await;
    let chunked = |body: &str| {
        let mut chunks = String::new();
        for piece in body.as_bytes().chunks(4) {
            chunks.push_str(&format!("{:x}\r\n{}\r\n", piece.len(), String::from_utf8_lossy(piece)));
        }
        format!(
            "POST /orders HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunks}0\r\n\r\n"
        )
    };
    for (n, body) in [r#"{"qty":3}"#, ""].into_iter().enumerate() {
        up.reject_next.store(true, Ordering::SeqCst);
        let resp = raw(tg.proxy_addr, chunked(body).as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{body:?}: {resp}");
        let seen = up.up.requests();
        assert_eq!(seen.len(), 2 * (n + 1));
        let (first, replay) = (&seen[2 * n], &seen[2 * n + 1]);
        assert_eq!((&first.body[..], &replay.body[..]), (body.as_bytes(), body.as_bytes()));
        assert_ne!(first.header("authorization"), replay.header("authorization"));
        assert_eq!(replay.header("content-length"), Some(body.len().to_string()));
    }
    // Longer than the replay buffer (64 KiB): streamed whole, and the 401 passes through.
    up.reject_next.store(true, Ordering::SeqCst);
    let resp = raw(tg.proxy_addr, chunked(&"x".repeat(70 * 1024)).as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert_eq!(up.up.requests().last().unwrap().body.len(), 70 * 1024);
    let m = metrics(&tg).await;
    assert!(m.contains(r#"tokengate_upstream_401_total{outcome="replayed",route="/"} 2"#), "{m}");
    assert!(m.contains(r#"tokengate_upstream_401_total{outcome="not_replayable",route="/"} 1"#), "{m}");
    assert_eq!(idp.calls(), 4);
}

/// Sends `n` concurrent requests and requires each to be answered 200.
async fn burst_all_ok(tg: &tokengate::server::Running, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let url = format!("http://{}/burst/{i}", tg.proxy_addr);
        tasks.spawn(async move { client().get(url).send().await.unwrap().status().as_u16() });
    }
    while let Some(s) = tasks.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
}

#[tokio::test]
async fn a_burst_of_401s_causes_one_refresh() {
    let (idp, up, tg) = replay_setup().await;
    up.rejected.lock().unwrap().insert("tok-1".into());
    burst_all_ok(&tg, 20).await;
    assert_eq!(idp.calls(), 2, "one refresh for the whole burst");
}

#[tokio::test]
async fn a_token_that_worked_and_is_then_refused_is_replaced_at_once_every_time() {
    let (idp, up, tg) = replay_setup().await;
    assert_eq!(get(&tg, "/1").await.0, 200, "tok-1 accepted");
    // Two revocations 100 ms apart: each is replaced at once, and the request replayed.
    up.rejected.lock().unwrap().insert("tok-1".into());
    let (status, body) = get(&tg, "/2").await;
    assert_eq!((status, body.contains("tok-2")), (200, true), "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.rejected.lock().unwrap().insert("tok-2".into());
    let (status, body) = get(&tg, "/3").await;
    assert_eq!((status, body.contains("tok-3")), (200, true), "{body}");
    for n in 4..8 {
        assert_eq!(get(&tg, &format!("/{n}")).await.0, 200);
    }
    // A burst that meets a revoked token still makes one IdP call for that generation.
    up.rejected.lock().unwrap().insert("tok-3".into());
    burst_all_ok(&tg, 20).await;
    assert_eq!(idp.calls(), 4, "one IdP call per revoked generation");
}

#[tokio::test]
async fn a_token_that_never_worked_backs_off_instead_of_flooding_the_idp() {
    let idp = ScriptedIdp::start(Arc::new(|_| Reply::Token { lifetime: 3600 })).await;
    // An upstream that accepts no token at all: wrong audience, say.
    let up = guarded_upstream(Arc::new(Mutex::new(HashSet::new()))).await;
    let tg = start(&config(idp.addr, &up.up.url(), "")).await;
    wait_ready(&tg).await;
    assert_eq!(get(&tg, "/1").await.0, 401);
    assert_eq!(idp.calls(), 2, "the first rejection of a fresh token refreshes once");
    for n in 0..10 {
        assert_eq!(get(&tg, &format!("/again/{n}")).await.0, 401);
    }
    assert_eq!(idp.calls(), 2, "later rejections wait for the backoff");
    assert!(
        metrics(&tg).await.contains(r#"tokengate_upstream_401_total{outcome="no_new_token",route="/"} 10"#)
    );
}

#[tokio::test]
async fn large_post_is_not_replayed_and_the_401_passes_through() {
    let (idp, up, tg) = replay_setup().await;
    up.reject_next.store(true, Ordering::SeqCst);
    let body = vec![b'x'; 100 * 1024];
    let r = client().post(format!("http://{}/upload", tg.proxy_addr)).body(body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(up.up.requests().len(), 1);
    assert_eq!(up.up.requests()[0].body.len(), 100 * 1024);
    // The rejected token was still replaced, so the next request works.
    assert_eq!(idp.calls(), 2);
    assert_eq!(get(&tg, "/after").await.0, 200);
    assert!(
        metrics(&tg).await.contains(r#"tokengate_upstream_401_total{outcome="not_replayable",route="/"} 1"#)
    );
}

#[tokio::test]
async fn upstream_reset_mid_response_is_not_passed_off_as_complete() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                // Small bodies are read whole before answering; large ones stream.
                let len = if buf[..n].starts_with(b"GET /small") { 1000 } else { 1_000_000 };
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b'a'; len / 2]).await;
                // Dropped here: the connection closes half-way through the body.
            });
        }
    });
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /\n    upstream: http://{addr}\n    provider: idp\n",
        idp.token_url()
    ))
    .await;
    let r = client().get(format!("http://{}/small", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 502, "caught before the head went out: a clean error");
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "upstream_error");
    let r = client().get(format!("http://{}/reset", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "a truncated body must surface as an error");
    let h2 = h2_client().get(format!("http://{}/reset", tg.proxy_addr)).send().await.unwrap();
    assert!(h2.bytes().await.is_err(), "HTTP/2 stream must be reset, not ended cleanly");
    // The proxy itself is fine.
    assert_eq!(client().get(format!("http://{}/healthz", tg.admin_addr)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn oversized_and_slow_request_bodies_are_refused() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "limits:\n  max_body_size: 1KiB\n  body_read_timeout: 300ms\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        idp.token_url(),
        up.url()
    ))
    .await;
    let r =
        client().post(format!("http://{}/big", tg.proxy_addr)).body(vec![0u8; 2048]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "body_too_large");
    assert!(up.requests().is_empty());
    // A chunked body that stalls mid-way.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
    s.write_all(
        b"POST /slow HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 408") && text.contains("body_timeout"), "{text}");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&format!(
        "limits:\n  idle_timeout: 300ms\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: idp\n",
        idp.token_url()
    ))
    .await;
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("connection was not closed");
    assert_eq!(n.unwrap(), 0);
}

// ---- the real binary: signals ----

fn binary_config(proxy: SocketAddr, admin: SocketAddr, idp: &Idp, routes: &[(&str, String)]) -> String {
    let mut s = format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\n  reload: true\nlimits:\n  shutdown_grace: 10s\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n",
        idp.token_url()
    );
    for (prefix, up) in routes {
        s.push_str(&format!("  - prefix: {prefix}\n    upstream: {up}\n    provider: idp\n"));
    }
    s
}

/// The `suppressed=N` counts of the log lines with `message` and `field`.
fn logged(log: &str, message: &str, field: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(message) && l.contains(&format!("{field} ")))
        .map(|l| {
            let held = l.rsplit_once("suppressed=").and_then(|(_, n)| n.trim().parse().ok());
            held.unwrap_or_else(|| panic!("a line without its suppressed=N count: {l}"))
        })
        .collect()
}

/// A flood of requests that each cause a log line (an unreachable upstream, a client outside the
/// allow-list, a foreign Host on the admin listener, an upstream refusing every token) writes about one line per second per route and kind, and the next line after it
/// counts what was held back; the metrics count every request. Another route's first failure
/// is logged at once, whatever the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_failing_or_denied_requests_do_not_flood_the_log() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let refuses = guarded_upstream(Arc::new(Mutex::new(HashSet::new()))).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tg.yaml");
    let (proxy, admin) = (closed_port(), closed_port());
    let mut yaml = binary_config(
        proxy,
        admin,
        &idp,
        &[
            ("/down", format!("http://{}", closed_port())),
            ("/also-down", format!("http://{}", closed_port())),
            ("/refuses", refuses.up.url()),
        ],
    );
    yaml.push_str(&format!(
        "  - prefix: /locked\n    upstream: {}\n    provider: idp\n    allow: [10.0.0.0/8]\n",
        up.url()
    ));
    std::fs::write(&path, yaml).unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;

    // The first refused token is replaced once; from then on refreshes back off, and each
    // refused request would log that.
    assert_eq!(client().get(format!("http://{proxy}/refuses/first")).send().await.unwrap().status(), 401);
    const N: usize = 300;
    let mut tasks = tokio::task::JoinSet::new();
    let foreign = async |url: String| {
        client().get(url).header("host", "evil.example").send().await.unwrap().status().as_u16()
    };
    for n in 0..N {
        for prefix in ["/down", "/locked", "/refuses"] {
            let url = format!("http://{proxy}{prefix}/{n}");
            tasks.spawn(async move { client().get(url).send().await.unwrap().status().as_u16() });
        }
        tasks.spawn(foreign(format!("http://{admin}/metrics")));
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(status) = tasks.join_next().await {
        *statuses.entry(status.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(statuses, [(401, N), (403, 2 * N), (502, N)].into_iter().collect());
    let floods = [
        ("upstream unreachable", "route=/down"),
        ("request denied", "route=/locked"),
        ("admin request denied", "reason=host_not_allowed"),
    ];
    assert_eq!(client().get(format!("http://{proxy}/also-down/1")).send().await.unwrap().status(), 502);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = p.log_text();
    for (message, field) in floods.into_iter().chain([("not refreshing yet", "provider=idp")]) {
        let lines = logged(&log, message, field);
        assert!((1..=3).contains(&lines.len()), "{} lines for {N} requests ({field}):\n{log}", lines.len());
    }
    assert_eq!(logged(&log, "upstream unreachable", "route=/also-down"), [0], "{log}");

    // After a quiet second, the next line says how many were held back: none are lost.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(client().get(format!("http://{proxy}/down/last")).send().await.unwrap().status(), 502);
    assert_eq!(client().get(format!("http://{proxy}/locked/last")).send().await.unwrap().status(), 403);
    assert_eq!(foreign(format!("http://{admin}/metrics")).await, 403);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = p.log_text();
    for (message, field) in floods {
        let lines = logged(&log, message, field);
        let accounted: u64 = lines.iter().map(|held| held + 1).sum();
        assert_eq!(accounted, N as u64 + 1, "{field}: {lines:?}");
    }
    let metrics = client().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
    };
    assert_eq!(
        count(r#"tokengate_upstream_errors_total{kind="upstream_unreachable",route="/down"}"#),
        Some(N + 1)
    );
    assert_eq!(
        count(r#"tokengate_denied_total{reason="address_not_allowed",route="/locked"}"#),
        Some(N + 1),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let idp = Idp::start(IdpOptions::default()).await;
    let slow = Upstream::start_with(None, Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tg.yaml");
    let (proxy, admin) = (closed_port(), closed_port());
    std::fs::write(&path, binary_config(proxy, admin, &idp, &[("/", slow.url())])).unwrap();
    let mut p = Process::spawn(&path, admin);
    p.ready().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..5 {
        let url = format!("http://{proxy}/slow/{i}");
        tasks.spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    p.signal("-TERM");
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 200, "an in-flight request was dropped");
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = p.child.wait().unwrap();
        std::mem::forget(p);
        s
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(client().get(format!("http://{proxy}/x")).send().await.is_err(), "still accepting after exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_the_old_config_when_the_file_is_broken_and_adds_new_routes() {
    let idp = Idp::start(IdpOptions::default()).await;
    let a = Upstream::start(None).await;
    let b = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tg.yaml");
    let (proxy, admin) = (closed_port(), closed_port());
    std::fs::write(&path, binary_config(proxy, admin, &idp, &[("/a", a.url())])).unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;
    let status = |path: &'static str| async move {
        client().get(format!("http://{proxy}{path}")).send().await.unwrap().status().as_u16()
    };
    assert_eq!(status("/a/1").await, 200);
    assert_eq!(status("/b/1").await, 404);

    std::fs::write(&path, "routes: [this is: not valid\n").unwrap();
    p.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status("/a/2").await, 200, "the old configuration must keep serving");
    let reload = client().post(format!("http://{admin}/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 422);
    let body = reload.text().await.unwrap();
    // The reason (file path, line, values) goes to the log, not to whoever called.
    assert!(
        body.contains("reload_failed") && !body.contains("tg.yaml") && !body.contains("this is"),
        "{body}"
    );

    std::fs::write(&path, binary_config(proxy, admin, &idp, &[("/a", a.url()), ("/b", b.url())])).unwrap();
    p.signal("-HUP");
    let mut served = false;
    for _ in 0..100 {
        if status("/b/1").await == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the new route was not served after SIGHUP");
    assert_eq!(status("/a/3").await, 200);
    assert_eq!(idp.calls(), 1, "an unchanged provider keeps its cached token");
    assert_eq!(b.requests().len(), 1);
}
