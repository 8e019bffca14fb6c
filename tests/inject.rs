//! The credential goes where the API wants it: a header with a scheme or raw, or a query
//! parameter; whatever the client sent there (or in `Authorization`) never reaches the upstream.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// tokengate with one route per `(prefix, inject)` to `up`.
async fn routes(idp: &Idp, up: &Upstream, injects: &[(&str, &str)]) -> tokengate::server::Running {
    let mut yaml = format!("{}routes:\n", idp.provider_yaml());
    for (prefix, inject) in injects {
        yaml.push_str(&format!(
            "  - prefix: {prefix}\n    upstream: {}\n    provider: idp\n    inject: {inject}\n",
            up.url()
        ));
    }
    start(&yaml).await
}

#[tokio::test]
async fn the_credential_goes_in_the_header_or_parameter_the_route_names() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = routes(
        &idp,
        &up,
        &[
            ("/raw", "{ header: X-Api-Key }"),
            ("/key", "{ header: Authorization, scheme: Key }"),
            ("/query", "{ query: token, scheme: Bearer }"),
        ],
    )
    .await;
    let send = async |path: &str| {
        let r = client()
            .get(format!("http://{}{path}", tg.proxy_addr))
            .header("x-api-key", "client-key")
            .header("authorization", "Basic Y2xpZW50OnNlY3JldA==")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        up.requests().pop().unwrap()
    };
    let token = |seen: &Seen| seen.header("x-api-key").unwrap_or_default();

    let seen = send("/raw/x").await;
    assert!(idp.valid(&format!("Bearer {}", token(&seen))), "{:?}", seen.headers);
    assert_eq!(seen.header("authorization"), None, "the client's Authorization reached the upstream");

    let seen = send("/key/x").await;
    let value = seen.header("authorization").unwrap();
    assert!(value.starts_with("Key ") && idp.valid(&value.replacen("Key ", "Bearer ", 1)), "{value}");
    assert_eq!(seen.header("x-api-key").as_deref(), Some("client-key"), "other headers pass");

    // The client's own token parameter, however spelled, is replaced; other parameters stay.
    let seen = send("/query/streams?tenant-name=acme&token=client&t%6Fken=sneaky&x=1").await;
    let query = seen.query.clone().unwrap();
    let (kept, ours) = query.rsplit_once("&token=").unwrap();
    assert_eq!(kept, "tenant-name=acme&x=1");
    assert!(ours.starts_with("Bearer%20") && idp.valid(&ours.replace("%20", " ")), "{query}");
    assert_eq!(seen.header("authorization"), None);
}

/// After an upstream 401, the replay carries the new token in the same place.
#[tokio::test]
async fn a_replay_after_a_401_puts_the_new_token_in_the_same_place() {
    let idp = Idp::start(IdpOptions::default()).await;
    // Refuses the first request it sees, whatever it carries.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = tokengate::demo::serve_fn(any(), move |req| {
        let seen = s.clone();
        async move {
            let req = capture(req).await;
            let mut seen = seen.lock().unwrap();
            seen.push(req);
            json(if seen.len() == 1 { 401 } else { 200 }, serde_json::json!({}))
        }
    })
    .await
    .unwrap();
    let up = Upstream { addr, seen: seen.clone() };
    let tg = routes(&idp, &up, &[("/q", "{ query: token, scheme: Bearer }")]).await;
    let r = client().get(format!("http://{}/q/x?a=1", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let token = |s: &Seen| s.query.clone().unwrap();
    assert!(
        token(&seen[0]).starts_with("a=1&token=Bearer%20")
            && token(&seen[1]).starts_with("a=1&token=Bearer%20")
    );
    assert_ne!(token(&seen[0]), token(&seen[1]), "the replay did not carry the new token");
    assert_eq!(token(&seen[1]).matches("token=").count(), 1);
}

/// `type: static` providers: an API key from a file (read again at every refresh, so a rotated
/// key is used without a reload) sent as `Authorization: Key`, and Basic from a username and a
/// password file. `/tokens` shows their state, never the value.
#[tokio::test]
async fn static_credentials_from_files_go_where_inject_says() {
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "first-key-0123\n").unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "s3cret").unwrap();
    let tg = start(&format!(
        "providers:\n  sensu:\n    type: static\n    value_file: {}\n    allowed_upstreams: [\"{}\"]\n  basic:\n    type: static\n    username: app\n    password_file: {}\nroutes:\n  - prefix: /sensu\n    upstream: {1}\n    provider: sensu\n    inject: {{ header: Authorization, scheme: Key }}\n  - prefix: /basic\n    upstream: {1}\n    provider: basic\n    inject: {{ header: Authorization, scheme: Basic }}\n",
        key_file.display(),
        up.url(),
        password_file.display()
    ))
    .await;
    let auth = async |path: &str| {
        let r = client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        up.requests().pop().unwrap().header("authorization").unwrap()
    };
    assert_eq!(auth("/sensu/api/core/v2/namespaces").await, "Key first-key-0123");
    assert_eq!(auth("/basic/x").await, "Basic YXBwOnMzY3JldA==");

    std::fs::write(&key_file, "second-key-4567\n").unwrap();
    tg.proxy.runtime.load().providers["sensu"].refresh().await.unwrap();
    assert_eq!(auth("/sensu/x").await, "Key second-key-4567");

    let tokens =
        client().get(format!("http://{}/tokens", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    assert!(
        tokens.contains("\"static\"") && !tokens.contains("second-key") && !tokens.contains("s3cret"),
        "{tokens}"
    );
}

#[test]
fn a_static_provider_needs_exactly_one_value() {
    let parse = |provider: &str| {
        let yaml = format!(
            "providers:\n  p:\n    type: static\n{provider}routes:\n  - prefix: /\n    upstream: https://api.example.com\n    provider: p\n"
        );
        tokengate::config::parse(&yaml, "t.yaml").map(|_| ()).map_err(|e| e.to_string())
    };
    assert_eq!(parse("    value: abc\n"), Ok(()));
    for bad in [
        "",
        "    value: a\n    username: u\n    password: p\n",
        "    username: u\n",
        "    value: a\n    token_url: https://idp.example.com/t\n",
        "    value_file: /nonexistent/key\n",
    ] {
        let err = parse(bad).unwrap_err();
        assert!(err.contains("providers.p"), "{bad:?}: {err}");
    }
}

/// A token whose `token_type` is not Bearer is refused on routes that would send it as Bearer by
/// default, and sent where a route says how.
#[tokio::test]
async fn a_token_type_other_than_bearer_goes_only_where_a_route_says_how() {
    let opts = IdpOptions { token_type: "MAC", ..IdpOptions::default() };
    let (stated, unstated) = (Idp::start(opts.clone()).await, Idp::start(opts).await);
    let up = Upstream::start(None).await;
    let yaml = format!(
        "providers:\n{}{}routes:\n  - prefix: /mac\n    upstream: {u}\n    provider: stated\n    inject: {{ header: Authorization, scheme: MAC }}\n  - prefix: /default\n    upstream: {u}\n    provider: unstated\n",
        stated.provider_entry("stated"),
        unstated.provider_entry("unstated"),
        u = up.url()
    );
    let tg = start(&yaml).await;

    let r = client().get(format!("http://{}/mac/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let value = up.requests().pop().unwrap().header("authorization").unwrap();
    assert!(stated.valid(&value.replacen("MAC ", "Bearer ", 1)), "{value}");

    let r = client().get(format!("http://{}/default/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable", "{body}");
    let tokens = admin_json(tg.admin_addr, "/tokens").await;
    let error = tokens["providers"]["unstated"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("token_type \"MAC\"") && error.contains("inject"), "{tokens}");
    assert_eq!(up.requests().len(), 1, "nothing was sent with the wrong scheme");
}
