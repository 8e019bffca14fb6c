//! One admission rule set whichever listener a request came in on: the same path spellings
//! through the reverse and the forward-proxy listener, the Host rule against DNS rebinding (in a
//! real browser), transfer codings, the protocol ALPN agreed.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The status code of a raw HTTP/1.1 answer.
fn status_of(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not an HTTP answer: {resp:?}"))
}

/// A route `/ua` open to all and a route `/ua/admin` open to nobody here, GET only; upstream
/// paths equal the request paths, so one spelling means the same through either listener.
async fn two_routes(idp: &Idp, up: &Upstream) -> tokengate::server::Running {
    start(&format!(
        "forward_proxy:\n  listen: 127.0.0.1:0\n{providers}routes:\n  - prefix: /ua\n    upstream: {up}/ua\n    provider: idp\n  - prefix: /ua/admin\n    upstream: {up}/ua/admin\n    provider: idp\n    allow: [10.20.0.0/16]\n    methods: [GET]\n",
        up = up.url(),
        providers = idp.provider_yaml()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_routes_and_checks_a_path_spelling_alike() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = two_routes(&idp, &up).await;
    let forward = tg.forward_addr.unwrap();
    // (path, status): the protected route's spellings are refused (403, or 400 when ambiguous);
    // the open route's are served.
    let spellings = [
        ("/ua/admin/users", 403),
        ("/ua/%61dmin/users", 403),
        ("/ua/ADMIN/../admin/users", 400),
        ("/ua/admin;x/users", 400),
        ("/ua;x/admin/users", 400),
        ("/ua/admin;/users", 400),
        ("/ua/admin%3Bx/users", 200),
        ("/ua/admin%2Fusers", 400),
        ("/ua/./admin/users", 400),
        ("/ua//admin/users", 400),
        ("/ua/admin\\users", 400),
        ("/ua/users", 200),
        ("/ua/items;v=2", 200),
    ];
    for (path, expected) in spellings {
        let reverse = raw(
            tg.proxy_addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let target = format!("http://{}{path}", up.addr);
        let forwarded = raw(
            forward,
            format!("GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", up.addr).as_bytes(),
        )
        .await;
        assert_eq!(status_of(&reverse), expected, "reverse listener, {path}: {reverse}");
        assert_eq!(status_of(&forwarded), expected, "forward-proxy listener, {path}: {forwarded}");
    }
    // Method rules too: the protected route takes GET only, on both listeners.
    let target = format!("http://{}/ua/admin/x", up.addr);
    let del = raw(
        forward,
        format!("DELETE {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", up.addr).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&del), 403, "{del}");
    let seen: Vec<String> = up.requests().into_iter().map(|s| s.path).collect();
    assert!(seen.iter().all(|p| !p.starts_with("/ua/admin/") && !p.starts_with("/ua/admin;")), "{seen:?}");
    assert_eq!(seen.len(), 2 * spellings.iter().filter(|(_, s)| *s == 200).count(), "{seen:?}");
}

/// A configuration with one route `/echo` to `up`, with `extra` at the top.
async fn echo_route(idp: &Idp, up: &Upstream, extra: &str) -> tokengate::server::Running {
    start(&format!("{extra}{}", idp.config_to(&up.url()).replace("prefix: /", "prefix: /echo"))).await
}

#[tokio::test]
async fn only_ip_literals_localhost_and_listed_names_are_served() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = echo_route(&idp, &up, "").await;
    let listed = echo_route(&idp, &up, "access:\n  hosts: [tokengate.svc]\n").await;
    let any = echo_route(&idp, &up, "access:\n  hosts: [\"*\"]\n").await;
    let get = async |tg: &tokengate::server::Running, host: Option<&str>| {
        let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        let version = if host.is_empty() { "1.0" } else { "1.1" };
        raw(
            tg.proxy_addr,
            format!("GET /echo/x HTTP/{version}\r\n{host}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
    };
    for host in ["127.0.0.1", "127.0.0.1:8080", "[::1]:8080", "localhost", "LOCALHOST:1"] {
        assert_eq!(status_of(&get(&tg, Some(host)).await), 200, "{host}");
    }
    // An HTTP/1.0 client may send no Host at all; a browser always sends one.
    assert_eq!(status_of(&get(&tg, None).await), 200);
    for host in
        ["rebind.test", "rebind.test:8080", "127.0.0.1.rebind.test", "localhost.rebind.test", "tokengate.svc"]
    {
        let resp = get(&tg, Some(host)).await;
        assert!(status_of(&resp) == 403 && resp.contains("host_not_allowed"), "{host}: {resp}");
    }
    assert_eq!(status_of(&get(&listed, Some("tokengate.svc:8080")).await), 200);
    assert_eq!(status_of(&get(&listed, Some("rebind.test")).await), 403);
    assert_eq!(status_of(&get(&any, Some("rebind.test")).await), 200);
    // HTTP/2 carries the host as :authority.
    let r =
        h2_client().get(format!("http://localhost:{}/echo/x", tg.proxy_addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Serves `page` once at `/`, then hands every later connection to `target`: what a DNS
/// rebinding attack achieves, the same origin reaching first the attacker and then tokengate.
async fn rebinding_origin(page: String, target: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut served = false;
        while let Ok((mut client, _)) = listener.accept().await {
            if !served {
                served = true;
                let mut head = vec![0u8; 4096];
                let _ = client.read(&mut head).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = client.write_all(resp.as_bytes()).await;
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// A page loaded from `http://rebind.test:PORT/` whose script then reads `/echo/secret` from
/// the same origin, now tokengate; what the script saw, as the page's DOM shows it.
async fn page_reads_through_rebinding(browser: &str, proxy: SocketAddr) -> String {
    let page = "<!doctype html><pre id=out>pending</pre><script>\
        fetch('/echo/secret', {cache: 'no-store'})\
          .then(r => r.text().then(t => { document.getElementById('out').textContent = 'status=' + r.status + ' ' + t; }))\
          .catch(e => { document.getElementById('out').textContent = 'error ' + e; });\
        </script>"
        .to_owned();
    let origin = rebinding_origin(page, proxy).await;
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (browser, profile) = (browser.to_owned(), dir.path().join("profile"));
        let url = format!("http://rebind.test:{}/", origin.port());
        move || {
            headless(
                &browser,
                &profile,
                &["--host-resolver-rules=MAP rebind.test 127.0.0.1", "--dump-dom"],
                &url,
            )
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !dom.contains(">pending<"),
        "the script did not finish:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// DNS rebinding, in headless Chromium: the page's same-origin GET carries neither `Origin` nor
/// `Sec-Fetch-*`, so only the Host rule stops it. With the name listed in `access.hosts` (the
/// control), the same page does read the upstream's answer, so the test can see a leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_on_a_rebinding_name_cannot_use_the_proxy() {
    let Some(browser) = chromium() else {
        skipped("chromium", "apt-get install chromium");
        return;
    };
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = echo_route(&idp, &up, "").await;
    let dom = page_reads_through_rebinding(browser, tg.proxy_addr).await;
    assert!(dom.contains("status=403") && dom.contains("host_not_allowed"), "{dom}");
    assert!(up.requests().is_empty(), "the upstream was reached");

    let listed = echo_route(&idp, &up, "access:\n  hosts: [rebind.test]\n").await;
    let dom = page_reads_through_rebinding(browser, listed.proxy_addr).await;
    assert!(dom.contains("status=200"), "{dom}");
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn transfer_codings_other_than_one_chunked_are_refused_and_the_connection_closed() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = echo_route(&idp, &up, "").await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    // The request after the body must never be read: the body's framing is not trusted.
    let next = "GET /echo/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for codings in [
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: x-custom, chunked",
        "Transfer-Encoding: deflate,chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: identity, chunked",
    ] {
        let resp = raw(
            tg.proxy_addr,
            format!("POST /echo/up HTTP/1.1\r\nHost: localhost\r\n{codings}\r\n\r\n{body}{next}").as_bytes(),
        )
        .await;
        let code = status_of(&resp);
        assert!(code == 501 || code == 400, "{codings}: {resp}");
        assert_eq!(resp.matches("HTTP/1.1").count(), 1, "{codings}: a second request was answered: {resp}");
        if code == 501 {
            assert!(resp.contains("unsupported_transfer_coding"), "{resp}");
        }
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests().iter().map(|s| &s.path).collect::<Vec<_>>());
    // chunked alone, in any case, is served.
    let resp = raw(
        tg.proxy_addr,
        format!("POST /echo/up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n{body}").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(up.requests()[0].body.as_ref(), b"hello");
}

/// A TLS connection to tokengate's TLS listener offering only `alpn`.
async fn tls_connection(
    pki: &Pki,
    addr: SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

/// Sends `bytes` and returns what comes back until the server closes or goes quiet.
async fn exchange(mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin, bytes: &[u8]) -> Vec<u8> {
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1000), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// RFC 9113 sections 3.2 and 3.4: after ALPN agreed on a protocol, the connection speaks it.
#[tokio::test]
async fn the_tls_listener_serves_exactly_the_protocol_alpn_agreed() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let pki = pki();
    let tls = format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert_file: {}\n  key_file: {}\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let tg = echo_route(&idp, &up, &tls).await;
    let addr = tg.tls_addr.unwrap();
    let http11 = b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

    // Each protocol on its own ALPN works.
    let ok = exchange(tls_connection(&pki, addr, b"http/1.1").await, http11).await;
    assert!(ok.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&ok));
    let settings = exchange(tls_connection(&pki, addr, b"h2").await, preface).await;
    assert_eq!(settings.get(3), Some(&4), "an HTTP/2 SETTINGS frame first: {settings:?}");

    // HTTP/1.1 bytes after h2 was agreed: no HTTP/1.1 answer (an HTTP/2 GOAWAY at most).
    let wrong = exchange(tls_connection(&pki, addr, b"h2").await, http11).await;
    assert!(!wrong.starts_with(b"HTTP/1.1"), "answered as HTTP/1.1: {}", String::from_utf8_lossy(&wrong));
    // An HTTP/2 preface after http/1.1 was agreed: no HTTP/2 SETTINGS.
    let wrong = exchange(tls_connection(&pki, addr, b"http/1.1").await, preface).await;
    assert!(wrong.is_empty() || wrong.starts_with(b"HTTP/1.1 4"), "{}", String::from_utf8_lossy(&wrong));
    assert_eq!(up.requests().len(), 1, "only the first request reached the upstream");
}

/// A request answered with an error before its body was read leaves the connection unusable
/// (the rest of the body would be read as the next request, so it is closed): the answer says
/// `Connection: close`, so a client does not send its next request into a closed socket. A
/// request without a body keeps its connection.
#[tokio::test]
async fn an_error_before_the_body_is_read_says_the_connection_closes() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = echo_route(&idp, &up, "").await;
    let dead = start(&format!(
        "limits:\n  warmup_timeout: 0s\nproviders:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        closed_port(),
        up.url()
    ))
    .await;
    let cases = [
        (&tg, "POST /nowhere HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n", "hello", 404),
        (
            &tg,
            "POST /echo/x HTTP/1.1\r\nHost: rebind.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
            403,
        ),
        (&dead, "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n", "hello", 503),
    ];
    for (tg, head, body, status) in cases {
        let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let resp = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert_eq!(status_of(&resp), status, "{resp}");
        assert!(resp.contains("connection: close"), "{head}: {resp}");
        let _ = s.write_all(body.as_bytes()).await;
    }
    // Without a body the connection stays open for the next request.
    let mut s = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let resp = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(resp.starts_with("http/1.1 404") && !resp.contains("connection: close"), "{resp}");
    }
}
