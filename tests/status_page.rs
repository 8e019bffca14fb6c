//! The admin status page: its JSON, who may load it, and the page itself rendered in a real
//! browser (headless Chromium, from Debian's `chromium` package; `.ci/run` installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;

/// A running binary with a working provider `good`, a failing one `bad`, a route for each, and
/// `POST /reload` on. Returns it with its proxy address and the working IdP.
async fn setup(dir: &std::path::Path) -> (Process, SocketAddr, Idp) {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let (proxy, admin) = (closed_port(), closed_port());
    let path = dir.join("tg.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\n  reload: true\nlimits:\n  warmup_timeout: 500ms\nproviders:\n  good:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\n  bad:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: client-2\n    client_secret: secret-2\nroutes:\n  - name: crm\n    prefix: /crm\n    upstream: {}\n    provider: good\n  - name: billing\n    prefix: /billing\n    upstream: {}\n    provider: bad\n",
            idp.token_url(),
            closed_port(),
            up.url(),
            up.url()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;
    for _ in 0..3 {
        assert_eq!(client().get(format!("http://{proxy}/crm/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(client().get(format!("http://{proxy}/billing/x")).send().await.unwrap().status(), 503);
    (p, proxy, idp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_describes_providers_and_routes_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _proxy, idp) = setup(dir.path()).await;
    let text =
        client().get(format!("http://{}/status.json", p.admin)).send().await.unwrap().text().await.unwrap();
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["providers"]["good"]["state"], "valid", "{s}");
    assert!(s["providers"]["good"]["expires_in_seconds"].as_u64().unwrap() > 3000);
    assert!(s["providers"]["good"]["refresh_in_seconds"].as_u64().is_some());
    assert_eq!(s["providers"]["bad"]["state"], "failing", "{s}");
    assert!(s["providers"]["bad"]["last_error"].is_string());
    let crm = s["routes"].as_array().unwrap().iter().find(|r| r["name"] == "crm").unwrap();
    assert_eq!((crm["requests"].as_u64(), crm["errors_5xx"].as_u64()), (Some(3), Some(0)), "{crm}");
    let billing = s["routes"].as_array().unwrap().iter().find(|r| r["name"] == "billing").unwrap();
    assert_eq!((billing["requests"].as_u64(), billing["errors_5xx"].as_u64()), (Some(1), Some(1)));
    assert_eq!(s["reload_enabled"], true);
    assert!(s["config"]["digest"].as_str().is_some_and(|d| d.len() == 12));
    for secret in ["secret-1", "secret-2"] {
        assert!(!text.contains(secret));
    }
    for token in idp.issued.lock().unwrap().keys() {
        assert!(!text.contains(token.as_str()), "a token is on the status page");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_pages_own_requests_pass_the_browser_check() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _proxy, _idp) = setup(dir.path()).await;
    let admin = p.admin;
    let status = async |method: &str, path: &str, headers: &[(&str, String)]| {
        let mut r = client().request(method.parse().unwrap(), format!("http://{admin}{path}"));
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.send().await.unwrap().status().as_u16()
    };
    let own = format!("http://{admin}");
    // Typed into the address bar, and the page's own requests.
    assert_eq!(
        status("GET", "/", &[("sec-fetch-site", "none".into()), ("sec-fetch-mode", "navigate".into())]).await,
        200
    );
    assert_eq!(status("GET", "/status.json", &[("sec-fetch-site", "same-origin".into())]).await, 200);
    assert_eq!(
        status("POST", "/reload", &[("sec-fetch-site", "same-origin".into()), ("origin", own.clone())]).await,
        200
    );
    // Another site's page: refused, whatever it asks for.
    for (method, path) in [("GET", "/"), ("GET", "/status.json"), ("POST", "/reload"), ("GET", "/tokens")] {
        assert_eq!(
            status(method, path, &[("sec-fetch-site", "cross-site".into())]).await,
            403,
            "{method} {path}"
        );
        assert_eq!(
            status(method, path, &[("origin", "http://evil.example".into())]).await,
            403,
            "{method} {path}"
        );
    }
    // Same-origin is only for the page's own endpoints.
    assert_eq!(status("GET", "/tokens", &[("sec-fetch-site", "same-origin".into())]).await, 403);
    let page = client().get(format!("http://{admin}/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page loads nothing from elsewhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_providers_and_routes_in_a_real_browser() {
    let Some(browser) = chromium() else {
        skipped("chromium", "apt-get install chromium");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (p, _proxy, idp) = setup(dir.path()).await;
    let url = format!("http://{}/", p.admin);
    let profile = dir.path().join("profile");
    let out = tokio::task::spawn_blocking({
        let (browser, profile, url) = (browser.to_owned(), profile.clone(), url.clone());
        move || headless(&browser, &profile, &["--dump-dom"], &url)
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page did not load its data:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains(r#"data-provider="good" data-state="valid""#), "{dom}");
    assert!(dom.contains(r#"data-provider="bad" data-state="failing""#), "{dom}");
    assert!(dom.contains(r#"data-route="crm""#) && dom.contains(r#"data-route="billing""#), "{dom}");
    assert!(
        dom.contains("Reload configuration") && !dom.contains(r#"id="reload" hidden"#),
        "reload is enabled: {dom}"
    );
    for token in idp.issued.lock().unwrap().keys() {
        assert!(!dom.contains(token.as_str()));
    }
    // A screenshot, for people (docs/status-page.png is one of these).
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let arg = format!("--screenshot={}", shot.display());
    let out = tokio::task::spawn_blocking(move || {
        headless(browser, &profile, &[&arg, "--window-size=1280,640"], &url)
    })
    .await
    .unwrap();
    assert!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
}
