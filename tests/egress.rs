//! Corporate egress proxies: token requests and upstream connections through a real forward
//! proxy (tinyproxy, started by the tests): CONNECT tunnels for TLS and WebSocket, absolute-form
//! requests for plain http, proxy authentication, `env`, `none`, `no_proxy`, and a proxy that
//! refuses or is down, reported as the proxy's fault.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// tinyproxy on a free loopback port, stopped (by PID) when dropped.
struct Tinyproxy {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Tinyproxy {
    /// A proxy asking for `user`/`password` when given; `None` (loudly) without tinyproxy.
    async fn start(auth: Option<(&str, &str)>) -> Option<Tinyproxy> {
        if std::process::Command::new("tinyproxy").arg("-v").output().is_err() {
            skipped("tinyproxy", "apt-get install tinyproxy");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let addr = closed_port();
        let mut conf = format!(
            "Port {}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nAllow 127.0.0.1\nLogLevel Connect\nLogFile \"{}\"\nPidFile \"{}\"\n",
            addr.port(),
            dir.path().join("tinyproxy.log").display(),
            dir.path().join("tinyproxy.pid").display(),
        );
        if let Some((user, password)) = auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf).unwrap();
        let mut child = std::process::Command::new("tinyproxy")
            .args(["-d", "-c", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Some(Tinyproxy { addr, dir, child });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("tinyproxy did not start");
    }

    /// The request lines the proxy logged (`CONNECT host:port ...`, `GET http://...`).
    fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                l.split_once("): ")
                    .filter(|_| l.contains("Request (file descriptor"))
                    .map(|(_, r)| r.to_owned())
            })
            .collect()
    }

    fn url(&self, auth: &str) -> String {
        format!("http://{auth}{}", self.addr)
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A provider against `idp` and routes to an `https://` upstream (the test CA's) and an
/// `http://` one, all under `egress`.
fn config(idp: &Idp, pki: &Pki, tls_up: SocketAddr, plain_up: &Upstream, egress: &str) -> String {
    format!(
        "{egress}{}routes:\n  - prefix: /tls\n    upstream: https://localhost:{}\n    provider: idp\n    ca_file: {}\n  - prefix: /plain\n    upstream: {}\n    provider: idp\n",
        idp.provider_yaml(),
        tls_up.port(),
        pki.ca.display(),
        plain_up.url()
    )
}

#[tokio::test]
async fn tokens_and_upstreams_go_through_an_authenticating_proxy() {
    let Some(proxy) = Tinyproxy::start(Some(("corp", "s3cret"))).await else { return };
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let (tls_up, tls_seen) = tls_upstream(&pki.server_cert, &pki.server_key).await;
    let plain_up = Upstream::start(None).await;
    // The user in the URL, the password in a file.
    let password = pki.dir.path().join("proxy-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let egress =
        format!("egress_proxy: {}\negress_proxy_password_file: {}\n", proxy.url("corp@"), password.display());
    let tg = start(&config(&idp, &pki, tls_up, &plain_up, &egress)).await;

    let r = client().get(format!("http://{}/tls/a", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let seen = tls_seen.lock().unwrap().pop().unwrap();
    assert!(idp.valid(&seen.header("authorization").unwrap()));
    let r = client().get(format!("http://{}/plain/b", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = plain_up.requests().pop().unwrap();
    assert!(idp.valid(&seen.header("authorization").unwrap()));
    // tinyproxy marks what it forwards.
    assert!(seen.header("via").is_some_and(|v| v.contains("tinyproxy")), "{:?}", seen.headers);
    let token_request = idp.seen.lock().unwrap()[0].clone();
    assert!(
        token_request.header("via").is_some_and(|v| v.contains("tinyproxy")),
        "the token request went direct"
    );

    let lines = proxy.requests();
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("CONNECT localhost:{}", tls_up.port()))),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.starts_with(&format!("GET {}/b ", plain_up.url()))), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("POST {} ", idp.token_url()))), "{lines:?}");
}

#[tokio::test]
async fn a_proxy_that_refuses_or_is_down_is_named_as_the_cause() {
    let Some(proxy) = Tinyproxy::start(Some(("corp", "s3cret"))).await else { return };
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let (tls_up, _) = tls_upstream(&pki.server_cert, &pki.server_key).await;
    let plain_up = Upstream::start(None).await;
    let down = closed_port();
    // Refusing credentials, tinyproxy closes the connection with the request body unread, so
    // its 407 may be lost to the reset: either way the message names the proxy and the fix.
    for (egress, expected) in [
        (format!("egress_proxy: {}\n", proxy.url("corp:wrong@")), "egress_proxy"),
        (format!("egress_proxy: http://{down}\n"), "cannot be reached"),
    ] {
        let tg = start(&config(&idp, &pki, tls_up, &plain_up, &egress)).await;
        let r = client().get(format!("http://{}/tls/a", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 503, "no token: the token request failed at the proxy");
        let tokens = admin_json(tg.admin_addr, "/tokens").await;
        let error = tokens["providers"]["idp"]["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(error.starts_with("egress proxy http://127.0.0.1:") && error.contains(expected), "{tokens}");
        assert!(!error.contains("wrong") && !error.contains("identity provider"), "{error}");
        tg.shutdown().await;
    }
    assert_eq!(idp.calls(), 0, "nothing reached the IdP");

    // With a credential that needs no IdP, the upstream side is refused the same way: the
    // proxy answers 407 to requests without credentials, to a CONNECT or in absolute form.
    for (egress, expected) in [(format!("egress_proxy: {}\n", proxy.url("")), 502)] {
        let yaml = format!(
            "{egress}providers:\n  key:\n    type: static\n    value: k\nroutes:\n  - prefix: /tls\n    upstream: https://localhost:{}\n    provider: key\n    ca_file: {}\n  - prefix: /plain\n    upstream: {}\n    provider: key\n",
            tls_up.port(),
            pki.ca.display(),
            plain_up.url()
        );
        let tg = start(&yaml).await;
        for path in ["/tls/a", "/plain/a"] {
            let r = client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap();
            assert_eq!(r.status(), expected, "{path}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "egress_proxy_failed", "{path}: {body}");
        }
    }
    assert!(plain_up.requests().is_empty());
}

/// `none` on a route or provider, and `no_proxy`, go direct; `env` reads the variables curl
/// reads (here in the real binary's environment).
#[tokio::test]
async fn none_no_proxy_and_env_choose_per_destination() {
    let Some(proxy) = Tinyproxy::start(None).await else { return };
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let (tls_up, _) = tls_upstream(&pki.server_cert, &pki.server_key).await;
    let plain_up = Upstream::start(None).await;

    // The IdP is in no_proxy; the plain route says none; only the TLS route is proxied.
    let egress = format!("egress_proxy: {}\nno_proxy: [\"127.0.0.1\"]\n", proxy.url(""));
    let mut yaml = config(&idp, &pki, tls_up, &plain_up, &egress);
    yaml.push_str("    egress_proxy: none\n");
    let tg = start(&yaml).await;
    for path in ["/tls/a", "/plain/a"] {
        let r = client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let lines = proxy.requests();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("CONNECT localhost:{}", tls_up.port())), "{lines:?}");
    let via = plain_up.requests()[0].header("via").unwrap_or_default();
    assert!(!via.contains("tinyproxy"), "{via}");
    tg.shutdown().await;

    // egress_proxy: env in the real binary: HTTPS_PROXY for https, http_proxy for http.
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (closed_port(), closed_port());
    let yaml = format!(
        "listen: {listen}\nadmin:\n  listen: {admin}\naccess_log: off\n{}",
        config(&idp, &pki, tls_up, &plain_up, "egress_proxy: env\n")
    );
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let proxy_url = proxy.url("");
    let p = Process::spawn_env(
        &path,
        admin,
        &[("HTTPS_PROXY", &proxy_url), ("http_proxy", &proxy_url), ("NO_PROXY", "")],
    );
    p.ready().await;
    for path in ["/tls/env", "/plain/env"] {
        let r = client().get(format!("http://{listen}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", p.log_text());
    }
    let lines = proxy.requests();
    assert!(lines.iter().any(|l| l.starts_with(&format!("GET {}/env ", plain_up.url()))), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("POST {} ", idp.token_url()))), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("CONNECT")).count(), 2, "{lines:?}");
}

/// A WebSocket to a plain `ws://` upstream goes through a CONNECT tunnel (a forward proxy cannot
/// carry an upgrade in absolute form).
#[tokio::test]
async fn a_websocket_goes_through_a_connect_tunnel() {
    use futures_util::{SinkExt, StreamExt};
    let Some(proxy) = Tinyproxy::start(None).await else { return };
    let idp = Idp::start(IdpOptions::default()).await;
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let ws_up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let yaml = format!(
        "egress_proxy: {}\n{}routes:\n  - prefix: /ws\n    upstream: ws://{ws_up}\n    provider: idp\n",
        proxy.url(""),
        idp.provider_yaml()
    );
    let tg = start(&yaml).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws/x", tg.proxy_addr)).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "hi");
    let lines = proxy.requests();
    assert!(lines.iter().any(|l| l.starts_with(&format!("CONNECT {ws_up}"))), "{lines:?}");
}
