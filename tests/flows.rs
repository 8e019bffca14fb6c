//! Every token flow of the provider documents, against mock servers that behave as the
//! documents (and ../shared/providers.md) describe.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;

fn unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An unsigned-looking JWT with the given claims (tokengate decodes, never verifies).
fn jwt(claims: serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"sig")
    )
}

async fn readyz(tg: &tokengate::server::Running) -> serde_json::Value {
    client().get(format!("http://{}/readyz", tg.admin_addr)).send().await.unwrap().json().await.unwrap()
}

async fn metrics(tg: &tokengate::server::Running) -> String {
    client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap()
}

async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A Covata-style token endpoint: password grant with Basic client auth, lower-case `bearer`,
/// rotating refresh tokens that work exactly once.
struct Covata {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<Seen>>>,
    valid_refresh: Arc<Mutex<HashSet<String>>>,
}

impl Covata {
    async fn start(lifetime: u64, refuse_all_refreshes: bool) -> Covata {
        let log = Arc::new(Mutex::new(Vec::new()));
        let valid_refresh = Arc::new(Mutex::new(HashSet::new()));
        let (l, v) = (log.clone(), valid_refresh.clone());
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = tokengate::demo::serve_fn(any(), move |req| {
            let (log, valid, counter) = (l.clone(), v.clone(), counter.clone());
            async move {
                let req = capture(req).await;
                log.lock().unwrap().push(req.clone());
                if !basic_matches(&req, "exampleClientApplication", "exampleClientApplicationSecret") {
                    return json(401, serde_json::json!({"error": "invalid_client"}));
                }
                let form = req.form();
                let ok = match form.get("grant_type").map(String::as_str) {
                    Some("password") => form.get("username").map(String::as_str) == Some("alice")
                        && form.get("password").map(String::as_str) == Some("pa ss+word&"),
                    Some("refresh_token") => {
                        let rt = form.get("refresh_token").cloned().unwrap_or_default();
                        !refuse_all_refreshes && valid.lock().unwrap().remove(&rt)
                    }
                    _ => false,
                };
                if !ok {
                    return json(400, serde_json::json!({"error": "invalid_grant", "error_description": "refresh token expired or used"}));
                }
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let rt = format!("R{n}");
                valid.lock().unwrap().insert(rt.clone());
                json(200, serde_json::json!({"access_token": format!("cov-{n}"), "token_type": "bearer", "expires_in": lifetime, "refresh_token": rt}))
            }
        })
        .await
        .unwrap();
        Covata { addr, log, valid_refresh }
    }

    fn grants(&self) -> Vec<(String, Option<String>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|s| {
                let f = s.form();
                (f.get("grant_type").cloned().unwrap_or_default(), f.get("refresh_token").cloned())
            })
            .collect()
    }
}

fn covata_config(addr: std::net::SocketAddr, up: &Upstream) -> String {
    format!(
        "providers:\n  covata:\n    type: oauth2\n    grant: password\n    token_url: http://{addr}/token\n    client_id: exampleClientApplication\n    client_secret: exampleClientApplicationSecret\n    username: alice\n    password: 'pa ss+word&'\nroutes:\n  - prefix: /covata\n    upstream: {}\n    provider: covata\n",
        up.url()
    )
}

#[tokio::test]
async fn password_grant_with_basic_client_auth_then_rotating_refresh_tokens() {
    let idp = Covata::start(2, false).await;
    let up = Upstream::start(None).await;
    let tg = start(&covata_config(idp.addr, &up)).await;
    wait_ready(&tg).await;
    let r = client().get(format!("http://{}/covata/files", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests()[0].header("authorization").as_deref(), Some("Bearer cov-1"));
    // 2 s tokens refresh about every second; each refresh must use the newest refresh token.
    wait_for(|| idp.grants().len() >= 4, "three refreshes").await;
    let grants = idp.grants();
    assert_eq!(grants[0].0, "password");
    for (i, (grant, rt)) in grants.iter().enumerate().skip(1).take(3) {
        assert_eq!(grant, "refresh_token");
        assert_eq!(rt.as_deref(), Some(format!("R{i}").as_str()), "refresh {i} must use the rotated token");
    }
    // Only the newest refresh token is still valid: nothing was replayed.
    assert_eq!(idp.valid_refresh.lock().unwrap().len(), 1);
    let r = client().get(format!("http://{}/covata/files", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn refused_refresh_falls_back_to_the_password_grant_once() {
    let idp = Covata::start(2, true).await;
    let up = Upstream::start(None).await;
    let tg = start(&covata_config(idp.addr, &up)).await;
    wait_ready(&tg).await;
    wait_for(|| idp.grants().len() >= 5, "two refresh cycles").await;
    let grants: Vec<String> = idp.grants().into_iter().map(|g| g.0).collect();
    // password, then per cycle: one refused refresh followed by exactly one password grant.
    assert_eq!(&grants[..5], ["password", "refresh_token", "password", "refresh_token", "password"]);
    assert_eq!(
        client().get(format!("http://{}/covata/x", tg.proxy_addr)).send().await.unwrap().status(),
        200
    );
    assert!(
        metrics(&tg).await.contains(r#"tokengate_token_fetches_total{provider="covata",result="success"}"#)
    );
}

#[tokio::test]
async fn refresh_token_grant_keeps_rotated_tokens_in_a_state_file_across_restarts() {
    let idp = Covata::start(3600, false).await;
    idp.valid_refresh.lock().unwrap().insert("SEED".into());
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("covata.rt");
    let yaml = format!(
        "providers:\n  covata:\n    type: oauth2\n    grant: refresh_token\n    token_url: http://{}/token\n    client_id: exampleClientApplication\n    client_secret: exampleClientApplicationSecret\n    refresh_token: SEED\n    state_file: {}\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: covata\n",
        idp.addr,
        state.display(),
        up.url()
    );
    let tg = start(&yaml).await;
    wait_ready(&tg).await;
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "R1");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    }
    tg.shutdown().await;
    // SEED is spent; only the state file's R1 works after the restart.
    let tg = start(&yaml).await;
    wait_ready(&tg).await;
    assert_eq!(idp.grants().last().unwrap().1.as_deref(), Some("R1"));
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "R2");
    let r = client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests()[0].header("authorization").as_deref(), Some("Bearer cov-2"));
}

/// A Sensu Go backend as its source behaves: `GET /auth` with Basic, `POST /auth/token` with the
/// old token as Bearer and `{"refresh_token"}`; a renew revokes the old access token, keeps the
/// refresh token and (newer router quirk) reports the *old* token's `expires_at`.
struct Sensu {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<Seen>>>,
    live: Arc<Mutex<HashSet<String>>>,
}

impl Sensu {
    async fn start(lifetime: u64, refuse_renew: bool) -> Sensu {
        let log = Arc::new(Mutex::new(Vec::new()));
        let live = Arc::new(Mutex::new(HashSet::new()));
        let expiry = Arc::new(Mutex::new(std::collections::HashMap::<String, u64>::new()));
        let (l, v) = (log.clone(), live.clone());
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = tokengate::demo::serve_fn(any(), move |req| {
            let (log, live, expiry, counter) = (l.clone(), v.clone(), expiry.clone(), counter.clone());
            async move {
                let req = capture(req).await;
                log.lock().unwrap().push(req.clone());
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let exp = unix() + lifetime;
                let token = jwt(serde_json::json!({"sub": "svc", "exp": exp, "n": n}));
                match (req.method.as_str(), req.path.as_str()) {
                    ("GET", "/auth") => {
                        let auth = req.header("authorization").unwrap_or_default();
                        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("svc-user:s3cret:x"));
                        if auth != expected {
                            return json(401, serde_json::json!("Unauthorized"));
                        }
                        live.lock().unwrap().insert(token.clone());
                        expiry.lock().unwrap().insert(token.clone(), exp);
                        json(200, serde_json::json!({"access_token": token, "expires_at": exp, "refresh_token": "REFRESH"}))
                    }
                    ("POST", "/auth/token") => {
                        let old = req.header("authorization").unwrap_or_default().trim_start_matches("Bearer ").to_owned();
                        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
                        if req.header("content-type").as_deref() != Some("application/json") || body["refresh_token"] != "REFRESH" {
                            return json(400, serde_json::json!({"message": "invalid refresh token"}));
                        }
                        let Some(old_exp) = expiry.lock().unwrap().get(&old).copied() else {
                            return json(400, serde_json::json!({"message": "invalid access token"}));
                        };
                        if refuse_renew {
                            return json(401, serde_json::json!({"message": "refresh token revoked"}));
                        }
                        live.lock().unwrap().remove(&old);
                        live.lock().unwrap().insert(token.clone());
                        expiry.lock().unwrap().insert(token.clone(), exp);
                        json(200, serde_json::json!({"access_token": token, "expires_at": old_exp, "refresh_token": "REFRESH"}))
                    }
                    _ => json(404, serde_json::json!({})),
                }
            }
        })
        .await
        .unwrap();
        Sensu { addr, log, live }
    }

    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().map(|s| format!("{} {}", s.method, s.path)).collect()
    }
}

fn sensu_config(addr: std::net::SocketAddr, up: &Upstream) -> String {
    format!(
        "providers:\n  sensu:\n    type: http\n    login:\n      method: GET\n      url: http://{addr}/auth\n      username: svc-user\n      password: 's3cret:x'\n    refresh:\n      url: http://{addr}/auth/token\n      bearer_current_token: true\n      json:\n        refresh_token: '{{refresh_token}}'\n    response:\n      expires_at: expires_at\nroutes:\n  - prefix: /sensu\n    upstream: {}\n    provider: sensu\n",
        up.url()
    )
}

#[tokio::test]
async fn sensu_login_expires_at_and_renew_with_the_old_token_as_bearer() {
    let sensu = Sensu::start(4, false).await;
    let up = Upstream::start(None).await;
    let tg = start(&sensu_config(sensu.addr, &up)).await;
    wait_ready(&tg).await;
    let r =
        client().get(format!("http://{}/sensu/api/core/v2/namespaces", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = up.requests()[0].header("authorization").unwrap();
    assert!(sensu.live.lock().unwrap().contains(first.trim_start_matches("Bearer ")));
    let ready = readyz(&tg).await;
    let expires_in = ready["providers"]["sensu"]["expires_in_seconds"].as_u64().unwrap();
    assert!((2..=4).contains(&expires_in), "lifetime from expires_at: {expires_in}");
    wait_for(|| sensu.calls().len() >= 3, "two renewals").await;
    let log = sensu.log.lock().unwrap().clone();
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[1].method, "POST");
    assert_eq!(log[1].path, "/auth/token");
    // The renew carries the token it replaces, which the backend then revokes.
    assert_eq!(log[1].header("authorization").unwrap(), first);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&log[1].body).unwrap(),
        serde_json::json!({"refresh_token": "REFRESH"})
    );
    // Each renew reply repeats the old expiry; tokengate takes the new JWT's exp instead of
    // spinning: about one renew per 2 s, not a storm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = sensu.calls().len();
    assert!(calls <= 6, "{calls} calls in about 4 s: {:?}", sensu.calls());
    assert!(sensu.calls()[1..].iter().all(|c| c == "POST /auth/token"), "{:?}", sensu.calls());
    let r = client().get(format!("http://{}/sensu/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let last = up.requests().last().unwrap().header("authorization").unwrap();
    assert!(
        sensu.live.lock().unwrap().contains(last.trim_start_matches("Bearer ")),
        "a revoked token was forwarded"
    );
}

#[tokio::test]
async fn sensu_refused_renew_falls_back_to_login() {
    let sensu = Sensu::start(2, true).await;
    let up = Upstream::start(None).await;
    let tg = start(&sensu_config(sensu.addr, &up)).await;
    wait_ready(&tg).await;
    wait_for(|| sensu.calls().len() >= 5, "renew attempts").await;
    assert_eq!(
        &sensu.calls()[..5],
        ["GET /auth", "POST /auth/token", "GET /auth", "POST /auth/token", "GET /auth"]
    );
    assert_eq!(client().get(format!("http://{}/sensu/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
}

async fn single_reply_idp(status: u16, body: serde_json::Value) -> std::net::SocketAddr {
    tokengate::demo::serve_fn(any(), move |_req| {
        let body = body.clone();
        async move { json(status, body) }
    })
    .await
    .unwrap()
}

fn oauth_config(idp: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "providers:\n  p:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: c\n    client_secret: s\n{extra}routes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: p\n"
    )
}

#[tokio::test]
async fn lifetime_comes_from_the_jwt_exp_when_the_reply_has_none() {
    let token = jwt(serde_json::json!({"exp": unix() + 40}));
    let idp = single_reply_idp(200, serde_json::json!({"access_token": token, "token_type": "Bearer"})).await;
    let tg = start(&oauth_config(idp, "")).await;
    wait_ready(&tg).await;
    let left = readyz(&tg).await["providers"]["p"]["expires_in_seconds"].as_u64().unwrap();
    assert!((37..=40).contains(&left), "{left}");
}

#[tokio::test]
async fn lifetime_falls_back_to_default_ttl_never_forever() {
    let idp =
        single_reply_idp(200, serde_json::json!({"access_token": "opaque", "token_type": "Bearer"})).await;
    let tg = start(&oauth_config(idp, "    default_ttl: 90s\n")).await;
    wait_ready(&tg).await;
    let left = readyz(&tg).await["providers"]["p"]["expires_in_seconds"].as_u64().unwrap();
    assert!((87..=90).contains(&left), "{left}");
}

#[tokio::test]
async fn both_error_body_shapes_reach_readyz_and_metrics() {
    for (body, code, text) in [
        (
            serde_json::json!({"error": "Forbidden", "errorDescription": "permission denied"}),
            "forbidden",
            "permission denied",
        ),
        (
            serde_json::json!({"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"}),
            "unauthorized_client",
            "Invalid client credentials",
        ),
    ] {
        let idp = single_reply_idp(401, body).await;
        let tg = start(&oauth_config(idp, "")).await;
        let mut ready = serde_json::Value::Null;
        for _ in 0..100 {
            ready = readyz(&tg).await;
            if ready["providers"]["p"]["last_error"].is_string() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ready["ready"], false);
        let err = ready["providers"]["p"]["last_error"].as_str().unwrap();
        assert!(err.contains("HTTP 401") && err.contains(text), "{err}");
        let m = metrics(&tg).await;
        assert!(
            m.contains(&format!(r#"tokengate_token_fetches_total{{provider="p",result="{code}"}}"#)),
            "{m}"
        );
        let r = client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "token_unavailable");
        assert!(!body.to_string().contains(text), "IdP detail must not leak to the downstream app");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_shows_expiry_and_claims_with_the_token_masked() {
    let token = jwt(serde_json::json!({"sub": "svc-42", "exp": unix() + 600, "scope": "read"}));
    let idp = single_reply_idp(200, serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": 600, "scope": "read"})).await;
    let refusing = single_reply_idp(
        400,
        serde_json::json!({"error": "invalid_scope", "error_description": "scope not allowed"}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tg.yaml");
    std::fs::write(
        &file,
        format!(
            "providers:\n  p:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: c\n    client_secret: s\n  q:\n    type: oauth2\n    token_url: http://{refusing}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: p\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate")).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let path = file.to_str().unwrap();
    let (code, out, err) = run(&["token", "-c", path, "p"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!out.contains(&token) && !err.contains(&token), "token printed without --show");
    assert!(
        out.contains("expires    in 600 s (from expires_in)")
            && out.contains("scope      read")
            && out.contains("\"sub\": \"svc-42\""),
        "{out}"
    );
    let (code, out, _) = run(&["token", "-c", path, "p", "--show"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&token));
    let (code, _, err) = run(&["token", "-c", path, "q"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid_scope") && err.contains("scope not allowed"), "{err}");
    assert_eq!(err.matches("scope not allowed").count(), 1, "the IdP's error is printed once: {err}");
    let (code, _, err) = run(&["token", "-c", path, "nope"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no provider named \"nope\""), "{err}");
}
