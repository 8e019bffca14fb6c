//! The proxy as a security boundary: who may connect, hostile requests sent as raw bytes, TLS
//! in both directions, and secrets that never leak.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const KEY_OLD: &str = "old-key-5f2c9a1e7b3d";
const KEY_NEW: &str = "new-key-9d8e7f6a5b4c";

async fn body_error(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    (status, v["error"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn address_allow_lists_on_listener_and_route() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "access:\n  allow: [127.0.0.0/8]\n{}routes:\n  - prefix: /open\n    upstream: {}\n    provider: idp\n  - prefix: /office\n    upstream: {}\n    provider: idp\n    allow: [10.20.0.0/16]\n",
        idp.provider_yaml(),
        up.url(),
        up.url()
    ))
    .await;
    let c = client();
    assert_eq!(c.get(format!("http://{}/open/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
    let (status, code) =
        body_error(c.get(format!("http://{}/office/x", tg.proxy_addr)).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (403, "address_not_allowed"));
    assert_eq!(up.requests().len(), 1);
    let denied =
        start(&format!("access:\n  allow: [10.0.0.0/8, 'fd00::/8']\n{}", idp.config_to(&up.url()))).await;
    let (status, code) =
        body_error(c.get(format!("http://{}/x", denied.proxy_addr)).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (403, "address_not_allowed"));
    let m =
        c.get(format!("http://{}/metrics", denied.admin_addr)).send().await.unwrap().text().await.unwrap();
    assert!(
        m.contains(r#"tokengate_denied_total{reason="address_not_allowed",route="_unmatched"} 1"#),
        "{m}"
    );
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn api_keys_are_required_rotatable_and_never_forwarded() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "access:\n  api_keys:\n    header: X-Tokengate-Key\n    keys: [{KEY_OLD}, {KEY_NEW}]\n{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n  - prefix: /public\n    upstream: {}\n    provider: idp\n    require_api_key: false\n",
        idp.provider_yaml(),
        up.url(),
        up.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/api/x", tg.proxy_addr);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "ApiKey realm=\"tokengate\"",
        "a 401 says how to authenticate"
    );
    let (s, code) = body_error(r).await;
    assert_eq!((s, code.as_str()), (401, "invalid_api_key"));
    let (s, _) =
        body_error(c.get(&url).header("x-tokengate-key", "new-key-9d8e7f6a5b4").send().await.unwrap()).await;
    assert_eq!(s, 401);
    for key in [KEY_OLD, KEY_NEW] {
        assert_eq!(c.get(&url).header("x-tokengate-key", key).send().await.unwrap().status(), 200);
    }
    assert_eq!(c.get(format!("http://{}/public/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
    assert_eq!(up.requests().len(), 3);
    assert!(
        up.requests().iter().all(|s| s.header("x-tokengate-key").is_none()),
        "the inbound key leaked upstream"
    );
}

#[tokio::test]
async fn read_only_route_answers_405_with_allow() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /ro\n    upstream: {}\n    provider: idp\n    methods: [get, HEAD]\n",
        idp.provider_yaml(),
        up.url()
    ))
    .await;
    let c = client();
    assert_eq!(c.get(format!("http://{}/ro/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
    assert_eq!(c.head(format!("http://{}/ro/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
    let r = c.delete(format!("http://{}/ro/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    assert_eq!(body_error(r).await, (405, "method_not_allowed".into()));
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn foreign_hosts_and_browser_requests_are_refused() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!("access:\n  hosts: [tokengate, 127.0.0.1]\n{}", idp.config_to(&up.url()))).await;
    let c = client();
    let url = format!("http://{}/x", tg.proxy_addr);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(c.get(&url).header("host", "tokengate:8080").send().await.unwrap().status(), 200);
    // DNS rebinding: a page on evil.example resolved to 127.0.0.1.
    let (s, code) = body_error(c.get(&url).header("host", "evil.example:8080").send().await.unwrap()).await;
    assert_eq!((s, code.as_str()), (403, "host_not_allowed"));
    for (h, v) in
        [("origin", "https://evil.example"), ("sec-fetch-mode", "cors"), ("sec-fetch-site", "same-origin")]
    {
        let (s, code) = body_error(c.get(&url).header(h, v).send().await.unwrap()).await;
        assert_eq!((s, code.as_str()), (403, "browser_request"), "{h}");
    }
    assert_eq!(up.requests().len(), 2);
}

async fn hostile_setup() -> (Upstream, tokengate::server::Running) {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /coreview/eu\n    upstream: {}/eu\n    provider: idp\n  - prefix: /coreview/gov\n    upstream: {}/gov\n    provider: idp\n",
        idp.provider_yaml(),
        up.url(),
        up.url()
    ))
    .await;
    wait_ready(&tg).await;
    (up, tg)
}

#[tokio::test]
async fn traversal_and_ambiguous_paths_never_reach_another_route() {
    let (up, tg) = hostile_setup().await;
    for path in [
        "/coreview/eu/../gov/users",
        "/coreview/eu/%2e%2e/gov/users",
        "/coreview/eu/%2E./gov/users",
        "/coreview/eu/.%2e/gov/users",
        "/coreview/eu/..;/gov/users",
        "/coreview/eu/./users",
        "/coreview/eu%2f..%2fgov/users",
        "/coreview/eu/..%5cgov/users",
        "/coreview/eu\\..\\gov/users",
        "/coreview/eu//evil.example/x",
        "/coreview/eu/%00x",
    ] {
        let resp = raw(
            tg.proxy_addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(resp.contains("\"invalid_path\"") || resp.len() < 200, "{path}: {resp}");
    }
    assert!(
        up.requests().is_empty(),
        "upstream saw {:?}",
        up.requests().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
}

/// One raw HTTP/1.1 request; returns the status code.
async fn raw_status(addr: std::net::SocketAddr, method: &str, path: &str) -> u16 {
    let resp = raw(
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{method} {path}: {resp}"))
}

#[tokio::test]
async fn every_spelling_of_a_path_is_checked_by_the_route_that_serves_it() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /a\n    upstream: {}/open\n    provider: idp\n  - prefix: /a/admin\n    upstream: {}/admin\n    provider: idp\n    allow: [10.20.0.0/16]\n  - prefix: /a/ro\n    upstream: {}/ro\n    provider: idp\n    methods: [GET]\n",
        idp.provider_yaml(),
        up.url(),
        up.url(),
        up.url()
    ))
    .await;
    // Spellings of /a/admin/users: all belong to the guarded route, so all are refused.
    for path in
        ["/a/admin/users", "/a/%61dmin/users", "/a/%61%64%6D%69%6E/users", "/%61/admin/users", "/a/admin%2Fx"]
    {
        let status = raw_status(tg.proxy_addr, "GET", path).await;
        assert!(status == 403 || status == 400, "{path}: {status}");
    }
    // The same over HTTP/2, where the path arrives as the :path pseudo-header.
    let r = h2_client().get(format!("http://{}/a/%61dmin/users", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // A ';' parameter that would move the path into another route for a servlet container.
    assert_eq!(raw_status(tg.proxy_addr, "GET", "/a;x=1/admin/users").await, 400);
    assert_eq!(raw_status(tg.proxy_addr, "DELETE", "/a/r%6F/item").await, 405);
    assert!(
        up.requests().is_empty(),
        "upstream saw {:?}",
        up.requests().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    // Allowed requests are forwarded in normal form.
    for (path, forwarded) in [
        ("/a/%7Euser/caf%c3%a9", "/open/~user/caf%C3%A9"),
        ("/a/items;v=2", "/open/items;v=2"),
        ("/a/x%3b%2d", "/open/x%3B-"),
        ("/a/r%6F/item?q=%61", "/ro/item"),
    ] {
        assert_eq!(raw_status(tg.proxy_addr, "GET", path).await, 200, "{path}");
        let seen = up.requests().pop().unwrap();
        assert_eq!(seen.path, forwarded, "{path}");
    }
    assert_eq!(up.requests().last().unwrap().query.as_deref(), Some("q=%61"), "the query is not touched");
    let r = h2_client().get(format!("http://{}/a/%7Ex?q=1", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.requests().pop().unwrap();
    assert_eq!((seen.path.as_str(), seen.query.as_deref()), ("/open/~x", Some("q=1")));
}

#[tokio::test]
async fn absolute_form_and_connect_are_refused() {
    let (up, tg) = hostile_setup().await;
    let resp = raw(
        tg.proxy_addr,
        b"GET http://evil.example/coreview/eu/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400") && resp.contains("absolute_form_not_allowed"), "{resp}");
    let resp =
        raw(tg.proxy_addr, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    let resp =
        raw(tg.proxy_addr, b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn smuggling_attempts_are_rejected_or_reach_the_upstream_as_one_clean_request() {
    let (up, tg) = hostile_setup().await;
    let bad_framing: [&[u8]; 9] = [
        // Two different Content-Lengths.
        b"POST /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        // A malformed Content-Length.
        b"POST /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4, 5\r\n\r\nabcde",
        // obs-fold.
        b"GET /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n  folded\r\n\r\n",
        // Invalid header name.
        b"GET /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nBad Header: 1\r\n\r\n",
        // Underscore header (may alias a dashed one upstream).
        b"GET /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nX_Api_Key: 1\r\nConnection: close\r\n\r\n",
        // Duplicate and missing Host.
        b"GET /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nHost: y\r\nConnection: close\r\n\r\n",
        b"GET /coreview/eu/a HTTP/1.1\r\nConnection: close\r\n\r\n",
        // Bare LF inside a header value, NUL in a value.
        b"GET /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n",
        b"GET /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nX-A: a\0b\r\n\r\n",
    ];
    for req in bad_framing {
        let resp = raw(tg.proxy_addr, req).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{}: {resp}", String::from_utf8_lossy(req));
        // Whether tokengate or hyper's parser refused it, the answer names the problem in JSON.
        assert!(!json_error(&resp).is_empty(), "{}: {resp}", String::from_utf8_lossy(req));
    }
    assert!(up.requests().is_empty(), "upstream saw {} requests", up.requests().len());

    // Content-Length together with Transfer-Encoding: chunked wins, the smuggled request after it
    // is not forwarded as a second request.
    let resp = raw(
        tg.proxy_addr,
        b"POST /coreview/eu/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /coreview/gov/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{:?}", seen.iter().map(|s| &s.path).collect::<Vec<_>>());
    assert_eq!(seen[0].path, "/eu/a");
    assert!(seen[0].body.is_empty());
    assert!(seen[0].header("transfer-encoding").is_none() || seen[0].header("content-length").is_none());
}

/// The `error` code of a raw HTTP/1.1 answer's JSON body, with its framing checked ("" if none).
fn json_error(resp: &str) -> String {
    let Some((head, body)) = resp.split_once("\r\n\r\n") else { return String::new() };
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
        .and_then(|v| v.trim().parse::<usize>().ok());
    assert_eq!(length, Some(body.len()), "body framing: {resp}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_upstreams_empty_error_answer_passes_unchanged() {
    // The rewrite of hyper's own answers must not touch a response that merely looks alike.
    let upstream = tokengate::demo::serve_fn(any(), |_req| async {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
        *r.status_mut() = http::StatusCode::BAD_REQUEST;
        r
    })
    .await
    .unwrap();
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&idp.config_to(&format!("http://{upstream}"))).await;
    wait_ready(&tg).await;
    let resp = raw(tg.proxy_addr, b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n") && !resp.contains("application/json"), "{resp}");
}

#[tokio::test]
async fn oversized_headers_get_431_and_slow_heads_are_cut() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "limits:\n  max_header_size: 16KiB\n  header_read_timeout: 500ms\n{}",
        idp.config_to(&up.url())
    ))
    .await;
    let big = format!("GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let resp = raw(tg.proxy_addr, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{}", &resp[..resp.len().min(200)]);
    assert_eq!(json_error(&resp), "headers_too_large", "{resp}");
    // The same for a request line that is too long, and for garbage.
    let long = format!("GET /{} HTTP/1.1\r\nHost: localhost\r\n\r\n", "a".repeat(64 * 1024));
    let resp = raw(tg.proxy_addr, long.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 4") && !json_error(&resp).is_empty(),
        "{}",
        &resp[..resp.len().min(300)]
    );
    let resp = raw(tg.proxy_addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n").await;
    assert_eq!(json_error(&resp), "invalid_request", "{resp}");
    let started = std::time::Instant::now();
    let resp = raw(tg.proxy_addr, b"GET /x HTTP/1.1\r\nHost: localhost\r\n").await;
    assert!(!resp.contains("200 OK"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn mtls_listener_verifies_client_certificates() {
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n  client_cert: optional\n{}routes:\n  - prefix: /secure\n    upstream: {}\n    provider: idp\n    require_client_cert: true\n  - prefix: /open\n    upstream: {}\n    provider: idp\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display(),
        idp.provider_yaml(),
        up.url(),
        up.url()
    ))
    .await;
    let tls = tg.tls_addr.unwrap();
    let with_cert = tls_client(&pki.ca_pem, Some((&pki.client_cert_pem, &pki.client_key_pem)));
    let without = tls_client(&pki.ca_pem, None);
    let r = with_cert.get(format!("https://127.0.0.1:{}/secure/x", tls.port())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests()[0].header("x-forwarded-proto").as_deref(), Some("https"));
    let r = without.get(format!("https://127.0.0.1:{}/secure/x", tls.port())).send().await.unwrap();
    assert_eq!(body_error(r).await, (403, "client_cert_required".into()));
    let r = without.get(format!("https://127.0.0.1:{}/open/x", tls.port())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Over plain HTTP the certificate route is never reachable.
    let r = client().get(format!("http://{}/secure/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(body_error(r).await, (403, "client_cert_required".into()));

    // In `required` mode a client without a certificate cannot even complete the handshake.
    let strict = start(&format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n{}routes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display(),
        idp.provider_yaml(),
        up.url()
    ))
    .await;
    let port = strict.tls_addr.unwrap().port();
    assert!(without.get(format!("https://127.0.0.1:{port}/x")).send().await.is_err());
    assert_eq!(with_cert.get(format!("https://127.0.0.1:{port}/x")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn upstream_certificates_are_always_verified() {
    // Both ways to an https upstream: the lean HTTP/1.1 client (default) and hyper's (auto).
    for (protocol, version) in [("http1", http::Version::HTTP_11), ("auto", http::Version::HTTP_2)] {
        let pki = pki();
        let idp = Idp::start(IdpOptions::default()).await;
        let (addr, seen) = tls_upstream(&pki.server_cert, &pki.server_key).await;
        let tg = start(&format!(
            "{}routes:\n  - prefix: /untrusted\n    upstream: https://127.0.0.1:{port}\n    provider: idp\n    upstream_protocol: {protocol}\n  - prefix: /trusted\n    upstream: https://127.0.0.1:{port}\n    provider: idp\n    ca_file: {}\n    upstream_protocol: {protocol}\n",
            idp.provider_yaml(),
            pki.ca.display(),
            port = addr.port()
        ))
        .await;
        let c = client();
        let r = c.get(format!("http://{}/untrusted/x", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 502, "{protocol}");
        assert!(
            seen.lock().unwrap().is_empty(),
            "{protocol}: a request crossed an unverified TLS connection"
        );
        let r = c.get(format!("http://{}/trusted/x", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{protocol}");
        let seen = seen.lock().unwrap()[0].clone();
        assert!(seen.header("authorization").unwrap().starts_with("Bearer tok-"));
        // auto: ALPN picked HTTP/2 with this upstream, which offers both.
        assert_eq!(seen.version, version, "{protocol}");
    }
}

#[test]
fn config_debug_output_has_no_secrets() {
    let text = format!(
        "access:\n  api_keys:\n    keys: [{KEY_OLD}]\nproviders:\n  p:\n    type: oauth2\n    grant: password\n    token_url: https://idp.example/token\n    client_id: c\n    client_secret: top-secret-value\n    username: u\n    password: hunter2-password\n  s:\n    type: http\n    login:\n      url: https://sensu.example/auth\n      username: u\n      password: sensu-password-1\nroutes:\n  - prefix: /\n    upstream: https://api.example\n    provider: p\n"
    );
    let config = tokengate::config::parse(&text, "t.yaml").unwrap();
    let debug = format!("{config:?}");
    for secret in [KEY_OLD, "top-secret-value", "hunter2-password", "sensu-password-1"] {
        assert!(!debug.contains(secret), "{secret} in Debug output");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_appears_in_trace_logs_metrics_or_error_bodies() {
    // A password-grant IdP that issues short-lived tokens with refresh tokens, so the trace log
    // covers fetches, refreshes and forwarding.
    let issued = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let i = issued.clone();
    let idp = tokengate::demo::serve_fn(any(), move |_req| {
        let issued = i.clone();
        async move {
            let n = issued.lock().unwrap().len();
            let (access, refresh) = (format!("access-{n}-{:016x}", rand::random::<u64>()), format!("refresh-{n}-{:016x}", rand::random::<u64>()));
            issued.lock().unwrap().extend([access.clone(), refresh.clone()]);
            json(200, serde_json::json!({"access_token": access, "token_type": "Bearer", "expires_in": 2, "refresh_token": refresh}))
        }
    })
    .await
    .unwrap();
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (closed_port(), closed_port());
    let client_secret = "client-secret-7c1d2e";
    let password = "user-password-9a8b7c";
    let config = format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\naccess:\n  api_keys:\n    keys: [{KEY_NEW}]\nproviders:\n  p:\n    type: oauth2\n    grant: password\n    token_url: http://{idp}/token\n    client_id: client-1\n    client_secret: ${{SECRET}}\n    username: svc\n    password_file: {}\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: p\n",
        dir.path().join("pw").display(),
        up.url()
    );
    std::fs::write(dir.path().join("pw"), password).unwrap();
    let path = dir.path().join("tg.yaml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["--log", "trace", "run", "-c", path.to_str().unwrap()])
        .env("SECRET", client_secret)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let c = client();
    wait_ready_at(admin).await;
    let mut bodies = String::new();
    let client_credential = "Basic Y2xpZW50LW93bi1zZWNyZXQ=";
    for path in ["/a", "/b?q=1"] {
        let r = c
            .get(format!("http://{proxy}{path}"))
            .header("x-api-key", KEY_NEW)
            .header("authorization", client_credential)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for (path, key) in
        [("/nokey", None), ("/wrong", Some("wrong-key-000000000000")), ("/x//y", Some(KEY_NEW))]
    {
        let mut req = c.get(format!("http://{proxy}{path}"));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        bodies.push_str(&req.send().await.unwrap().text().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // at least two refreshes
    let r = c.get(format!("http://{proxy}/c")).header("x-api-key", KEY_NEW).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let metrics = c.get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    bodies.push_str(&c.get(format!("http://{admin}/readyz")).send().await.unwrap().text().await.unwrap());
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("TRACE") && logs.contains("DEBUG"), "trace logging is not on");
    assert!(logs.contains("token obtained"));
    assert!(bodies.contains("invalid_api_key") && bodies.contains("invalid_path"), "{bodies}");
    let issued = issued.lock().unwrap().clone();
    assert!(issued.len() >= 6, "expected refreshes, saw {} tokens", issued.len());
    let mut secrets: Vec<&str> = vec![client_secret, password, KEY_NEW, "Y2xpZW50LW93bi1zZWNyZXQ"];
    secrets.extend(issued.iter().map(String::as_str));
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
        assert!(!metrics.contains(secret), "{secret} appears in the metrics");
        assert!(!bodies.contains(secret), "{secret} appears in an error body");
    }
}

#[tokio::test]
async fn secrets_an_idp_echoes_in_its_error_text_are_redacted_everywhere() {
    // An IdP that quotes the whole request back in its error: headers and body.
    let idp = tokengate::demo::serve_fn(any(), move |req| async move {
        let seen = capture(req).await;
        let echo = format!(
            "refused {} {:?} body={} json={}",
            seen.path,
            seen.header("authorization"),
            String::from_utf8_lossy(&seen.body),
            serde_json::to_string(&String::from_utf8_lossy(&seen.body)).unwrap()
        );
        json(401, serde_json::json!({"error": "invalid_client", "error_description": format!("{echo} {}", "padding ".repeat(100))}))
    })
    .await
    .unwrap();
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (closed_port(), closed_port());
    let (client_secret, password, sensu_password) = ("cl!ent secret&7c1d", "pass:word+9a8b", "sensu-pw-55aa");
    let config = format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\nproviders:\n  basic:\n    type: oauth2\n    grant: password\n    token_url: http://{idp}/token\n    client_id: client-1\n    client_secret: ${{SECRET}}\n    username: svc\n    password: ${{PASSWORD}}\n  post:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: client-2\n    client_auth: post\n    client_secret: ${{SECRET}}\n  sensu:\n    type: http\n    login:\n      method: GET\n      url: http://{idp}/auth\n      username: admin\n      password: ${{SENSU}}\n    response:\n      access_token: access_token\nroutes:\n  - prefix: /a\n    upstream: {}\n    provider: basic\n  - prefix: /b\n    upstream: {}\n    provider: post\n  - prefix: /c\n    upstream: {}\n    provider: sensu\n",
        up.url(),
        up.url(),
        up.url()
    );
    let path = dir.path().join("tg.yaml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["--log", "debug", "run", "-c", path.to_str().unwrap()])
        .env("SECRET", client_secret)
        .env("PASSWORD", password)
        .env("SENSU", sensu_password)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let c = client();
    let mut shown = String::new();
    for _ in 0..250 {
        if let Ok(r) = c.get(format!("http://{admin}/readyz")).send().await {
            shown = r.text().await.unwrap();
            if shown.matches("refused").count() >= 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for route in ["/a/x", "/b/x", "/c/x"] {
        shown.push_str(&c.get(format!("http://{proxy}{route}")).send().await.unwrap().text().await.unwrap());
    }
    shown.push_str(&c.get(format!("http://{admin}/tokens")).send().await.unwrap().text().await.unwrap());
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(shown.matches("refused").count() >= 3, "the IdP errors are not reported: {shown}");
    assert!(logs.contains("refused"), "the IdP errors are not logged");
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    for secret in [
        client_secret.to_owned(),
        form(client_secret),
        password.to_owned(),
        form(password),
        sensu_password.to_owned(),
        b64(&format!("admin:{sensu_password}")),
        b64(&format!("client-1:{}", form(client_secret))),
    ] {
        // Not even a part of one: text cut before redaction would leave most of a secret behind.
        let part = &secret[..8];
        assert!(!logs.contains(part), "{secret} appears (partly) in the log");
        assert!(!shown.contains(part), "{secret} appears (partly) in /readyz, /tokens or an error body");
    }
    // IdP text is bounded: the 800-character padding is cut.
    assert!(!shown.contains(&"padding ".repeat(40)), "IdP error text is not bounded");
}

#[tokio::test]
async fn forwarding_claims_of_untrusted_clients_are_replaced_and_trusted_proxies_are_appended_to() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    // Every spelling of an address, host or scheme claim that frameworks and gateways read.
    let claims = [
        "Forwarded: for=1.2.3.4",
        "X-Real-IP: 1.2.3.4",
        "True-Client-IP: 1.2.3.4",
        "X-Originating-IP: 1.2.3.4",
        "X-Forwarded: for=1.2.3.4",
        "X-Host: admin.internal",
        "X-HTTP-Host-Override: admin.internal",
        "X-Remote-IP: 1.2.3.4",
        "X-Remote-Addr: 1.2.3.4",
        "X-Client-IP: 1.2.3.4",
        "X-Cluster-Client-IP: 1.2.3.4",
        "Client-IP: 1.2.3.4",
        "X-Original-Host: admin.internal",
        "X-ProxyUser-Ip: 1.2.3.4",
        "X-Envoy-External-Address: 1.2.3.4",
        "CF-Connecting-IP: 1.2.3.4",
        "Forwarded-For: 1.2.3.4",
        "X-Forwarded-Server: admin.internal",
        "X-Url-Scheme: https",
        "Front-End-Https: on",
    ];
    let mut request = String::from(
        "GET /x HTTP/1.1\r\nHost: tokengate:8080\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Host: admin.internal\r\nX-Forwarded-Proto: https\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n",
    );
    for claim in claims {
        request.push_str(claim);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    let untrusted = start(&format!("access:\n  hosts: [tokengate]\n{}", idp.config_to(&up.url()))).await;
    assert!(raw(untrusted.proxy_addr, request.as_bytes()).await.starts_with("HTTP/1.1 200"));
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host").as_deref(), Some("tokengate:8080"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    let names = claims.iter().map(|c| c.split(':').next().unwrap_or(c));
    for gone in names.chain(["X-Original-URL", "X-Rewrite-URL"]) {
        assert_eq!(seen.header(gone), None, "{gone} passed through from an untrusted client");
    }
    let trusted = start(&format!(
        "access:\n  hosts: [tokengate]\n  trusted_proxies: [127.0.0.0/8]\n  forwarded: both\n{}",
        idp.config_to(&up.url())
    ))
    .await;
    assert!(raw(trusted.proxy_addr, request.as_bytes()).await.starts_with("HTTP/1.1 200"));
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("1.2.3.4, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host").as_deref(), Some("admin.internal"));
    assert_eq!(seen.header("x-real-ip").as_deref(), Some("1.2.3.4"));
    assert_eq!(
        seen.header("forwarded").as_deref(),
        Some("for=1.2.3.4, for=127.0.0.1;host=\"tokengate:8080\";proto=http")
    );
    assert_eq!(seen.header("x-original-url"), None, "path overrides never pass");
    // HTTP/2 has no Host header: the authority is what the upstream is told.
    let r = h2_client().get(format!("http://{}/h2", untrusted.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-host"), Some(untrusted.proxy_addr.to_string()));
}

#[tokio::test]
async fn trace_unknown_methods_and_method_overrides_need_a_route_that_allows_them() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n  - prefix: /ro\n    upstream: {}\n    provider: idp\n    methods: [GET]\n  - prefix: /dav\n    upstream: {}\n    provider: idp\n    methods: [PROPFIND, TRACE]\n",
        idp.provider_yaml(),
        up.url(),
        up.url(),
        up.url()
    ))
    .await;
    for (method, path, extra, want) in [
        ("TRACE", "/x", "", "405"),
        ("PROPFIND", "/x", "", "405"),
        ("BREW", "/x", "", "405"),
        ("GET", "/x", "X-HTTP-Method-Override: TRACE\r\n", "405"),
        ("GET", "/ro/x", "X-HTTP-Method-Override: DELETE\r\n", "405"),
        ("POST", "/ro/x", "X-Method-Override: GET\r\n", "405"),
        ("GET", "/ro/x", "X-HTTP-Method: bad method\r\n", "405"),
    ] {
        let resp = raw(
            tg.proxy_addr,
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(resp.starts_with(&format!("HTTP/1.1 {want}")), "{method} {path} {extra}: {resp}");
        assert!(
            resp.contains("method_not_allowed") && resp.to_ascii_lowercase().contains("\r\nallow: "),
            "{resp}"
        );
    }
    assert!(
        up.requests().is_empty(),
        "upstream saw {:?}",
        up.requests().iter().map(|s| &s.method).collect::<Vec<_>>()
    );
    for (method, path, extra) in [
        ("PROPFIND", "/dav/x", ""),
        ("TRACE", "/dav/x", ""),
        ("GET", "/ro/x", "X-HTTP-Method-Override: GET\r\n"),
        ("DELETE", "/x", ""),
    ] {
        let resp = raw(
            tg.proxy_addr,
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{method} {path}: {resp}");
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_error_and_never_reaches_the_upstream_whole() {
    // A raw upstream that records every byte it receives.
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let r = received.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    r.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&idp.config_to(&format!("http://{upstream}"))).await;
    for body in [
        "5\r\nhello\r\nZZ\r\nworld\r\n0\r\n\r\n",
        "5\r\nhello\r\n3;ext\r\nabcdef\r\n0\r\n\r\n",
        "5\r\nhelloXX",
    ] {
        let resp = raw(
            tg.proxy_addr,
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
                .as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 400") && resp.contains("invalid_body"), "{body:?}: {resp}");
    }
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(!seen.contains("0\r\n\r\n"), "the upstream got a terminated body: {seen:?}");
    let m =
        client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    assert!(!m.contains("tokengate_upstream_errors_total{"), "counted as an upstream error: {m}");
    assert!(m.contains(r#"tokengate_requests_total{method="POST",route="/",status="400"} 3"#), "{m}");
}

#[tokio::test]
async fn websocket_upgrades_are_refused_plainly_and_h2c_offers_ignored() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&idp.config_to(&up.url())).await;
    let ws = "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let resp = raw(tg.proxy_addr, ws.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 501") && resp.contains("upgrade_not_supported"), "{resp}");
    assert!(up.requests().is_empty(), "a refused upgrade reached the upstream");
    let h2c = "GET /x HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n";
    let resp = raw(tg.proxy_addr, h2c.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = up.requests().pop().unwrap();
    assert!(seen.header("upgrade").is_none() && seen.header("http2-settings").is_none());
}

#[tokio::test]
async fn every_request_carries_one_request_id_to_the_upstream_and_back() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&idp.config_to(&up.url())).await;
    let c = client();
    let r = c
        .get(format!("http://{}/a", tg.proxy_addr))
        .header("x-request-id", "trace-42.a:b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42.a:b");
    assert_eq!(up.requests().pop().unwrap().header("x-request-id").as_deref(), Some("trace-42.a:b"));
    // A malformed one is replaced, and so is a missing one; refusals carry one too.
    let r =
        c.get(format!("http://{}/b", tg.proxy_addr)).header("x-request-id", "bad id\"").send().await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 32);
    assert_eq!(up.requests().pop().unwrap().header("x-request-id"), Some(made));
    let r = c.get(format!("http://{}/a//b", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-request-id"].len(), 32);
}
