//! Client certificates to upstreams (mutual TLS): a route's `client_cert_file` and
//! `client_key_file` are presented to an upstream that requires them, checked when loaded, and
//! re-read when they change while requests flow.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// An HTTPS upstream that requires a client certificate issued by the test CA and records, for
/// every request it answers, the leaf certificate the client presented.
async fn mtls_upstream(pki: &Pki) -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let config =
        tokengate::tls::server_config(&pki.server_cert, &pki.server_key, Some(&pki.ca), true).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let p = peers.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, peers) = (acceptor.clone(), p.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                let svc = hyper::service::service_fn(move |_req| {
                    peers.lock().unwrap().push(leaf.clone());
                    async { Ok::<_, std::convert::Infallible>(json(200, serde_json::json!({}))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, peers)
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A route to `upstream` trusting the test CA, with `extra` route keys.
fn route(prefix: &str, upstream: std::net::SocketAddr, pki: &Pki, extra: &str) -> String {
    format!(
        "  - prefix: {prefix}\n    upstream: https://localhost:{}\n    provider: idp\n    ca_file: {}\n{extra}",
        upstream.port(),
        pki.ca.display()
    )
}

fn identity(cert: &Path, key: &Path) -> String {
    format!("    client_cert_file: {}\n    client_key_file: {}\n", cert.display(), key.display())
}

#[tokio::test]
async fn a_route_presents_its_client_certificate_and_others_present_none() {
    let pki = pki();
    let dir = pki.dir.path();
    let (cert, key) = (write(dir, "c.pem", &pki.client_cert_pem), write(dir, "c.key", &pki.client_key_pem));
    let idp = Idp::start(IdpOptions::default()).await;
    let (up, peers) = mtls_upstream(&pki).await;
    let http1 = format!("{}    upstream_protocol: http1\n", identity(&cert, &key));
    let yaml = format!(
        "{}routes:\n{}{}{}",
        idp.provider_yaml(),
        route("/mtls", up, &pki, &identity(&cert, &key)),
        route("/mtls1", up, &pki, &http1),
        route("/plain", up, &pki, "")
    );
    let tg = start(&yaml).await;
    for protocol in [client(), h2_client()] {
        let r = protocol.get(format!("http://{}/mtls/x", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // Uploads larger than the replay buffer stream through the HTTP/2 connections, or through
    // the pooled client to an HTTP/1.1 upstream: each presents the certificate too.
    for prefix in ["/mtls", "/mtls1"] {
        let url = format!("http://{}{prefix}/x", tg.proxy_addr);
        let r = client().post(url).body(vec![b'x'; 100_000]).send().await.unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
    }
    assert_eq!(*peers.lock().unwrap(), vec![der(&pki.client_cert_pem); 4]);

    let r = client().get(format!("http://{}/plain/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 502, "the upstream requires a certificate this route does not have");
    assert_eq!(peers.lock().unwrap().len(), 4);
    tg.shutdown().await;
}

#[tokio::test]
async fn unusable_client_certificates_are_refused_when_loaded() {
    let pki = pki();
    let dir = pki.dir.path();
    let (cert, key) = (write(dir, "c.pem", &pki.client_cert_pem), write(dir, "c.key", &pki.client_key_pem));
    let other_key = write(dir, "other.key", &pki.client2_key_pem);
    let idp = Idp::start(IdpOptions::default()).await;
    let yaml = |extra: &str, upstream: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n{}routes:\n  - prefix: /a\n    upstream: {upstream}\n    provider: idp\n{extra}",
            idp.provider_yaml()
        )
    };
    let parse = |extra: &str, upstream: &str| {
        tokengate::config::parse(&yaml(extra, upstream), "t.yaml").map(|_| ()).unwrap_err().to_string()
    };
    let cert_only = format!("    client_cert_file: {}\n", cert.display());
    let err = parse(&cert_only, "https://localhost");
    assert!(err.contains("routes[0].client_cert_file") && err.contains("needs client_key_file"), "{err}");
    let err = parse(&identity(&cert, &key), "http://localhost");
    assert!(err.contains("needs TLS") && err.contains("plain http"), "{err}");

    // Files that do not belong together, or are not there, stop the start with their names.
    for (extra, expected) in [
        (identity(&cert, &other_key), "does not belong to the certificate"),
        (identity(&dir.join("missing.pem"), &key), "missing.pem"),
    ] {
        let config = tokengate::config::parse(&yaml(&extra, "https://localhost"), "t.yaml").unwrap();
        let err = tokengate::server::start(config).await.map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(expected) && err.contains("route /a"), "{err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
    }
}

/// Replaced the way the kubelet does: a new file renamed over the old.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_renewed_client_certificate_is_presented_without_failing_a_request() {
    let pki = pki();
    let dir = pki.dir.path();
    let (cert, key) = (write(dir, "c.pem", &pki.client_cert_pem), write(dir, "c.key", &pki.client_key_pem));
    let idp = Idp::start(IdpOptions::default()).await;
    let (up, peers) = mtls_upstream(&pki).await;
    let (proxy, admin) = (closed_port(), closed_port());
    let yaml = format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\naccess_log: off\n{}routes:\n{}",
        idp.provider_yaml(),
        route("/mtls", up, &pki, &identity(&cert, &key))
    );
    let p = Process::spawn(&write(dir, "tokengate.yaml", &yaml), admin);
    p.ready().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flow = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client().get(format!("http://{proxy}/mtls/x")).send().await.unwrap();
                statuses.push(r.status().as_u16());
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    replace(&cert, &pki.client2_cert_pem);
    replace(&key, &pki.client2_key_pem);
    let renewed = der(&pki.client2_cert_pem);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !peers.lock().unwrap().contains(&renewed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never presented\n{}",
            p.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = flow.await.unwrap();
    assert!(statuses.len() > 10 && statuses.iter().all(|s| *s == 200), "{statuses:?}\n{}", p.log_text());
    let seen = peers.lock().unwrap().clone();
    let first_new = seen.iter().position(|c| *c == renewed).unwrap();
    assert!(
        seen[first_new..].iter().all(|c| *c == renewed),
        "the old certificate came back after the new one"
    );
}

/// A private-CA upstream without `ca_file` gets a 502 that names the cause and the fix; one
/// reached by IP address with a certificate for a name is reached with `server_name`.
#[tokio::test]
async fn certificate_problems_are_named_and_server_name_fixes_an_alias() {
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let (up, _) = tls_upstream(&pki.server_cert, &pki.server_key).await;
    // The test certificate names localhost and 127.0.0.1; "alias.internal" is only the SNI.
    let yaml = format!(
        "{}routes:\n  - prefix: /untrusted\n    upstream: https://localhost:{port}\n    provider: idp\n  - prefix: /wrong-name\n    upstream: https://127.0.0.1:{port}\n    provider: idp\n    ca_file: {ca}\n    server_name: alias.internal\n  - prefix: /named\n    upstream: https://127.0.0.1:{port}\n    provider: idp\n    ca_file: {ca}\n    server_name: localhost\n",
        idp.provider_yaml(),
        port = up.port(),
        ca = pki.ca.display()
    );
    let tg = start(&yaml).await;
    let get = async |path: &str| {
        let r = client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let (status, body) = get("/untrusted/x").await;
    assert_eq!((status, body["error"].as_str()), (502, Some("upstream_certificate_refused")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("ca_file"), "{body}");
    let (status, body) = get("/wrong-name/x").await;
    assert_eq!(status, 502, "{body}");
    assert!(body["message"].as_str().unwrap().contains("server_name"), "{body}");
    let (status, body) = get("/named/x").await;
    assert_eq!(status, 200, "{body}");
    tg.shutdown().await;
}

/// `check --live` shakes hands with every https upstream as its route would, and names a
/// certificate problem with its fix; no request (and so no credential) is sent.
#[tokio::test]
async fn check_live_verifies_each_upstreams_certificate() {
    let pki = pki();
    let (up, seen) = tls_upstream(&pki.server_cert, &pki.server_key).await;
    let yaml = format!(
        "providers:\n  key: {{ type: static, value: secret-value }}\nroutes:\n  - prefix: /good\n    upstream: https://localhost:{port}\n    provider: key\n    ca_file: {ca}\n  - prefix: /bad\n    upstream: https://localhost:{port}/v2\n    provider: key\n",
        port = up.port(),
        ca = pki.ca.display()
    );
    let path = write(pki.dir.path(), "check.yaml", &yaml);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["check", path.to_str().unwrap(), "--live"])
            .env_clear()
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let good = stdout.lines().find(|l| l.contains(&format!("localhost:{}: ", up.port()))).unwrap();
    assert!(good.contains("OK (certificate verified for localhost, ALPN h2)"), "{stdout}");
    let bad = stdout.lines().find(|l| l.contains("/v2:")).unwrap();
    assert!(bad.contains("FAILED") && bad.contains("UnknownIssuer") && bad.contains("ca_file"), "{stdout}");
    assert!(stdout.contains("0 provider(s) and 1 upstream(s) failed"), "{stdout}");
    assert!(seen.lock().unwrap().is_empty(), "a request reached the upstream");
    assert!(!stdout.contains("secret-value"));
}
