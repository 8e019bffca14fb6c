//! The core proxy, end to end over loopback: routing, header rewriting, token injection and
//! the errors a downstream app sees.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn replaces_client_authorization_with_the_injected_bearer_token() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /api/\n    upstream: {}\n    provider: idp\n",
        idp.provider_yaml(),
        up.url()
    ))
    .await;
    let resp = client()
        .get(format!("http://{}/api/users?id=7&x=a%20b", tg.proxy_addr))
        .header("authorization", "Basic Y2xpZW50OnNlY3JldA==")
        .header("proxy-authorization", "Basic eHh4")
        .header("connection", "keep-alive, authorization")
        .header("x-app", "legacy")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &up.requests()[0];
    let auth = seen.header("authorization").unwrap();
    assert!(auth.starts_with("Bearer tok-1-"), "{auth}");
    assert!(idp.valid(&auth));
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(seen.header("proxy-authorization"), None);
    assert_eq!(seen.header("x-app").as_deref(), Some("legacy"));
    assert_eq!(seen.path, "/users");
    assert_eq!(seen.query.as_deref(), Some("id=7&x=a%20b"));
    assert_eq!(seen.header("host"), Some(up.addr.to_string()));
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some(tg.proxy_addr.to_string()));
    assert_eq!(seen.header("via").as_deref(), Some("1.1 tokengate"));

    // HTTP/2 has no Host: the :authority is what the client addressed, and X-Forwarded-Host
    // carries it just the same (as the README says).
    let resp = h2_client().get(format!("http://{}/api/h2?x=1", tg.proxy_addr)).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    let seen = up.requests().last().cloned().unwrap();
    assert_eq!(seen.header("x-forwarded-host"), Some(tg.proxy_addr.to_string()), "HTTP/2 request");
    assert_eq!(seen.header("host"), Some(up.addr.to_string()));
    assert_eq!(seen.header("via").as_deref(), Some("2 tokengate"));
}

#[tokio::test]
async fn longest_prefix_wins_and_strip_prefix_applies() {
    let idp = Idp::start(IdpOptions::default()).await;
    let a = Upstream::start(None).await;
    let b = Upstream::start(None).await;
    let c = Upstream::start(None).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n  - prefix: /api/v2/\n    upstream: {}/base/path/\n    provider: idp\n  - prefix: /keep\n    upstream: {}/root\n    provider: idp\n    strip_prefix: false\n",
        idp.provider_yaml(),
        a.url(),
        b.url(),
        c.url()
    ))
    .await;
    let get = |p: &str| client().get(format!("http://{}{p}", tg.proxy_addr)).send();
    assert_eq!(get("/api/v2/items/1?q=1").await.unwrap().status(), 200);
    assert_eq!(get("/api/v1/items").await.unwrap().status(), 200);
    assert_eq!(get("/api").await.unwrap().status(), 200);
    assert_eq!(get("/keep/x").await.unwrap().status(), 200);
    assert_eq!(get("/apiv2").await.unwrap().status(), 404);
    let paths = |u: &Upstream| u.requests().iter().map(|s| s.path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&b), ["/base/path/items/1"]);
    assert_eq!(b.requests()[0].query.as_deref(), Some("q=1"));
    assert_eq!(paths(&a), ["/v1/items", "/"]);
    assert_eq!(paths(&c), ["/root/keep/x"]);
}

#[tokio::test]
async fn basic_client_auth_encodes_reserved_characters_per_rfc6749() {
    let secret = "s:e%c+r et/é";
    let idp = Idp::start(IdpOptions {
        client_id: "id:with%".into(),
        client_secret: secret.into(),
        ..Default::default()
    })
    .await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: 'id:with%'\n    client_secret: '{secret}'\n    scopes: [b.read, a.write]\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        idp.token_url(),
        up.url()
    ))
    .await;
    let resp = client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let req = &idp.seen.lock().unwrap()[0];
    let auth = req.header("authorization").unwrap();
    assert_eq!(auth, tokengate::token::oauth2::basic_auth("id:with%", secret, false));
    assert_eq!(req.form().get("scope").map(String::as_str), Some("b.read a.write"));
    assert_eq!(req.header("accept").as_deref(), Some("application/json"));
    assert!(!String::from_utf8_lossy(&req.body).contains("client_secret"));
}

#[tokio::test]
async fn post_client_auth_sends_credentials_in_the_body() {
    let secret = "p+lus&amp=é";
    let idp =
        Idp::start(IdpOptions { auth: Auth::Post, client_secret: secret.into(), ..Default::default() }).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: '{secret}'\n    client_auth: post\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        idp.token_url(),
        up.url()
    ))
    .await;
    assert_eq!(client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
    let body = String::from_utf8(idp.seen.lock().unwrap()[0].body.to_vec()).unwrap();
    // `+` must arrive as %2B: Keycloak decodes a bare `+` as a space.
    assert!(body.contains("client_secret=p%2Blus%26amp%3D%C3%A9"), "{body}");
}

#[tokio::test]
async fn oidc_discovery_finds_the_token_endpoint_and_checks_the_issuer() {
    let idp = Idp::start(IdpOptions::default()).await;
    let token_url = idp.token_url();
    let issuer_addr = tokengate::demo::serve_fn(any(), move |req| {
        let token_url = token_url.clone();
        async move {
            let host = req.headers().get("host").unwrap().to_str().unwrap().to_owned();
            match req.uri().path() {
                "/good/.well-known/openid-configuration" => json(
                    200,
                    serde_json::json!({"issuer": format!("http://{host}/good"), "token_endpoint": token_url}),
                ),
                "/evil/.well-known/openid-configuration" => json(
                    200,
                    serde_json::json!({"issuer": "https://attacker.example", "token_endpoint": token_url}),
                ),
                _ => json(404, serde_json::json!({})),
            }
        }
    })
    .await
    .unwrap();
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "providers:\n  good:\n    type: oauth2\n    issuer: http://{issuer_addr}/good\n    client_id: client-1\n    client_secret: secret-1\n  evil:\n    type: oauth2\n    issuer: http://{issuer_addr}/evil/\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /good\n    upstream: {}\n    provider: good\n  - prefix: /evil\n    upstream: {}\n    provider: evil\n",
        up.url(),
        up.url()
    ))
    .await;
    let ok = client().get(format!("http://{}/good/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let refused = client().get(format!("http://{}/evil/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["provider"], "evil");
    let ready: serde_json::Value =
        client().get(format!("http://{}/readyz", tg.admin_addr)).send().await.unwrap().json().await.unwrap();
    assert!(ready["providers"]["evil"]["last_error"].as_str().unwrap().contains("issuer"), "{ready}");
    assert_eq!(up.requests().len(), 1, "nothing is forwarded without a token");
}

#[tokio::test]
async fn two_hundred_sequential_requests_cause_one_token_fetch() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&idp.config_to(&up.url())).await;
    let c = client();
    for i in 0..200 {
        let r = c.get(format!("http://{}/n/{i}", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn a_hundred_concurrent_requests_at_cold_start_cause_one_token_fetch() {
    let idp = Idp::start(IdpOptions { delay: Duration::from_millis(300), ..Default::default() }).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&idp.config_to(&up.url())).await;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let (c, url) = (c.clone(), format!("http://{}/c/{i}", tg.proxy_addr));
        tasks.spawn(async move { c.get(url).send().await.unwrap().status() });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(idp.calls(), 1);
    assert_eq!(up.requests().len(), 100);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_expiry_without_failures() {
    let idp = Idp::start(IdpOptions { lifetime: Duration::from_secs(2), ..Default::default() }).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&idp.config_to(&up.url())).await;
    wait_ready(&tg).await;
    let c = client();
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(5500) {
        let r = c.get(format!("http://{}/tick", tg.proxy_addr)).send().await.unwrap();
        // The upstream answers 401 to any token the IdP no longer considers valid.
        assert_eq!(r.status(), 200, "request {n} failed after {:?}", started.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refreshed about every second (margin: half of a 2 s lifetime), in the background.
    assert!((4..=9).contains(&idp.calls()), "{} token fetches", idp.calls());
    let tokens: std::collections::HashSet<_> =
        up.requests().iter().map(|s| s.header("authorization")).collect();
    assert!(tokens.len() >= 4, "{} distinct tokens", tokens.len());
}

#[tokio::test]
async fn http2_clients_are_served() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /h2\n    upstream: {}\n    provider: idp\n",
        idp.provider_yaml(),
        up.url()
    ))
    .await;
    let r = h2_client()
        .post(format!("http://{}/h2/upload?v=2", tg.proxy_addr))
        .header("authorization", "Bearer client-own")
        .body("x".repeat(100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen = &up.requests()[0];
    assert_eq!(seen.body.len(), 100_000);
    assert_eq!(seen.path, "/upload");
    assert!(idp.valid(&seen.header("authorization").unwrap()));
    assert_eq!(seen.header("via").as_deref(), Some("2 tokengate"));
}

#[tokio::test]
async fn errors_are_json_with_stable_codes_and_no_internal_detail() {
    let idp = Idp::start(IdpOptions::default()).await;
    let slow = Upstream::start_with(None, Duration::from_secs(3)).await;
    let dead = closed_port();
    let tg = start(&format!(
        "limits:\n  upstream_timeout: 300ms\n{}routes:\n  - prefix: /slow\n    upstream: {}\n    provider: idp\n  - prefix: /dead\n    upstream: http://{dead}\n    provider: idp\n",
        idp.provider_yaml(),
        slow.url()
    ))
    .await;
    let c = client();
    let call = |path: &'static str| {
        let c = c.clone();
        let url = format!("http://{}{path}", tg.proxy_addr);
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.headers()["content-type"], "application/json");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, text)
        }
    };
    let (s, body) = call("/nothing/here").await;
    assert_eq!(s, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["error"].as_str(), v["path"].as_str()), (Some("no_route"), Some("/nothing/here")));
    let (s, body) = call("/dead/x").await;
    assert_eq!(s, 502);
    assert!(body.contains("\"upstream_unreachable\"") && !body.contains(&dead.port().to_string()), "{body}");
    let (s, body) = call("/slow/x").await;
    assert_eq!(s, 504);
    assert!(body.contains("\"upstream_timeout\""), "{body}");
    let metrics =
        client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"tokengate_upstream_errors_total{kind="upstream_timeout",route="/slow"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tokengate_requests_total{method="GET",route="/dead",status="502"} 1"#));
}

#[tokio::test]
async fn readyz_waits_for_a_token_and_metrics_pass_promtool() {
    let idp = Idp::start(IdpOptions { delay: Duration::from_millis(300), ..Default::default() }).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&idp.config_to(&up.url())).await;
    let ready = client().get(format!("http://{}/readyz", tg.admin_addr)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    wait_ready(&tg).await;
    assert_eq!(client().get(format!("http://{}/healthz", tg.admin_addr)).send().await.unwrap().status(), 200);
    client().get(format!("http://{}/m", tg.proxy_addr)).send().await.unwrap();
    let metrics =
        client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    for name in [
        "tokengate_requests_total{",
        "tokengate_request_duration_seconds_bucket{",
        "tokengate_token_fetches_total{provider=\"idp\",result=\"success\"} 1",
        "tokengate_token_fetch_duration_seconds_count{provider=\"idp\"} 1",
        "tokengate_token_expiry_timestamp_seconds{provider=\"idp\"}",
        "tokengate_inflight_requests 0",
        "tokengate_build_info{version=",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }
    for token in idp.issued.lock().unwrap().keys() {
        assert!(!metrics.contains(token.as_str()));
    }
    assert!(!metrics.contains("secret-1"));
    promtool_check(&metrics);
}

/// Runs `promtool check metrics` when promtool is installed (`.ci/run` installs it).
fn promtool_check(metrics: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        skipped("promtool", "apt-get install prometheus");
        return;
    };
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn providers_with_identical_settings_share_one_token() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let twin = |name: &str| {
        format!(
            "  {name}:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\n    scopes: [a, b]\n",
            idp.token_url()
        )
    };
    let tg = start(&format!(
        "providers:\n{}{}routes:\n  - prefix: /eu\n    upstream: {}\n    provider: eu\n  - prefix: /us\n    upstream: {}\n    provider: us\n",
        twin("eu"),
        twin("us"),
        up.url(),
        up.url()
    ))
    .await;
    for path in ["/eu/x", "/us/x", "/eu/y"] {
        assert_eq!(
            client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(idp.calls(), 1);
    let auth: std::collections::HashSet<_> =
        up.requests().iter().map(|s| s.header("authorization")).collect();
    assert_eq!(auth.len(), 1);
}
