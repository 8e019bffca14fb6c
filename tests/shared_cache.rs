//! Replicas act as one through the shared cache, and Redis trouble costs no more than its
//! timeouts: a new token reaches every replica at once, a replica in backoff takes the token
//! another one stored, lifetimes count from when the token request was sent, a hanging IdP
//! answers 503 quickly, and what is planted in Redis (huge values, old entries, locks without
//! expiry) cannot hurt. Real `redis-server` (`.ci/run` installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;

const CACHE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// An IdP whose every new token revokes the previous ones (django-oauth-toolkit does), that can
/// be taken down, made to hang, or told to issue JWTs expiring sooner than `expires_in` says.
#[derive(Clone)]
struct RevokingIdp {
    addr: SocketAddr,
    latest: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    hang: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl RevokingIdp {
    /// Tokens of `lifetime`; after `delay` (a slow IdP); JWTs whose `exp` is `jwt_exp` from now.
    async fn start(lifetime: u64, delay: Duration, jwt_exp: Option<u64>) -> RevokingIdp {
        let latest = Arc::new(AtomicU64::new(0));
        let (down, hang, calls) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (l, d, h, c) = (latest.clone(), down.clone(), hang.clone(), calls.clone());
        let addr = tokengate::demo::serve_fn(any(), move |_req| {
            let (latest, down, hang, calls) = (l.clone(), d.clone(), h.clone(), c.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if hang.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                tokio::time::sleep(delay).await;
                if down.load(Ordering::SeqCst) {
                    return json(503, serde_json::json!({"error": "temporarily_unavailable"}));
                }
                let n = latest.fetch_add(1, Ordering::SeqCst) + 1;
                let token = match jwt_exp {
                    None => format!("tok-{n}"),
                    Some(secs) => jwt(n, secs),
                };
                json(200, serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime}))
            }
        })
        .await
        .unwrap();
        RevokingIdp { addr, latest, down, hang, calls }
    }

    fn valid(&self, bearer: &str) -> bool {
        let n = self.latest.load(Ordering::SeqCst);
        bearer == format!("Bearer tok-{n}")
            || bearer.starts_with(&format!("Bearer {}", jwt(n, 0).split('.').next().unwrap()))
    }
}

/// An unsigned JWT numbered `n` whose `exp` is `secs` from now.
fn jwt(n: u64, secs: u64) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + secs;
    format!(
        "{}.{}.sig",
        b64(serde_json::json!({"alg": "none", "n": n})),
        b64(serde_json::json!({"exp": exp}))
    )
}

/// An upstream answering 401 to any token but the IdP's latest, recording (path, status).
async fn checking_upstream(idp: &RevokingIdp) -> (String, Arc<Mutex<Vec<(String, u16)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, idp) = (seen.clone(), idp.clone());
    let addr = tokengate::demo::serve_fn(any(), move |req| {
        let (seen, idp) = (s.clone(), idp.clone());
        async move {
            let req = capture(req).await;
            let status = if idp.valid(&req.header("authorization").unwrap_or_default()) { 200 } else { 401 };
            seen.lock().unwrap().push((req.path.clone(), status));
            json(status, serde_json::json!({}))
        }
    })
    .await
    .unwrap();
    (format!("http://{addr}"), seen)
}

/// A replica (in this process) sharing `redis_url`'s cache, with `extra` top-level YAML.
async fn replica(
    redis_url: &str,
    idp: &RevokingIdp,
    upstream: &str,
    extra: &str,
) -> tokengate::server::Running {
    start(&format!(
        "{extra}shared_cache:\n  redis: {redis_url}\n  key: {CACHE_KEY}\n  connect_timeout: 300ms\n  timeout: 300ms\nproviders:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: {upstream}\n    provider: idp\n",
        idp.addr
    ))
    .await
}

async fn status(tg: &tokengate::server::Running, path: &str) -> u16 {
    client().get(format!("http://{}{path}", tg.proxy_addr)).send().await.unwrap().status().as_u16()
}

/// `/tokens`' view of the provider.
async fn token_state(tg: &tokengate::server::Running) -> serde_json::Value {
    let v: serde_json::Value =
        client().get(format!("http://{}/tokens", tg.admin_addr)).send().await.unwrap().json().await.unwrap();
    v["providers"]["idp"].clone()
}

/// With Redis unreachable (nothing listening) or hanging (it accepts and never answers), a
/// token costs at most `connect_timeout + timeout` more than the IdP, and later fetches skip
/// Redis for a while: a replica started during an outage answers its first request at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_trouble_costs_no_more_than_its_timeouts() {
    let hanging = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hanging.accept().await {
            held.push(s);
        }
    });
    let idp = RevokingIdp::start(3600, Duration::ZERO, None).await;
    let (up, _) = checking_upstream(&idp).await;
    for url in [format!("redis://127.0.0.1:{}", closed_port().port()), format!("redis://{hanging_addr}")] {
        let tg = replica(&url, &idp, &up, "limits:\n  warmup_timeout: 0s\n").await;
        let started = Instant::now();
        assert_eq!(status(&tg, "/first").await, 200, "{url}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{url}: the first request took {:?}",
            started.elapsed()
        );
        tg.shutdown().await;
    }
}

/// One replica refreshes (and the IdP revokes the token the others hold): the others switch to
/// the new token at once, announced over pub/sub, instead of sending the revoked one until the
/// upstream refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_reaches_every_replica_at_once() {
    let Some(redis) = RedisServer::start(false) else { return };
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let idp = RevokingIdp::start(4, Duration::ZERO, None).await;
    let (up, seen) = checking_upstream(&idp).await;
    let a = replica(&url, &idp, &up, "").await;
    wait_ready(&a).await;
    // B starts a second later, on A's token: it would refresh half a second after A.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = replica(&url, &idp, &up, "").await;
    wait_ready(&b).await;
    let started = Instant::now();
    let mut flushed = false;
    while started.elapsed() < Duration::from_secs(9) {
        assert_eq!(status(&a, "/a").await, 200);
        assert_eq!(status(&b, "/b").await, 200);
        if !flushed && started.elapsed() > Duration::from_secs(4) {
            // Redis loses its data (a restart without persistence): generations start over.
            redis.cli(&["FLUSHALL"]);
            flushed = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let refused = |path: &str| seen.iter().filter(|(p, s)| p == path && *s == 401).count();
    let sent = seen.iter().filter(|(p, _)| p == "/b").count();
    assert!(idp.latest.load(Ordering::SeqCst) >= 4, "no refresh happened");
    assert!(
        idp.latest.load(Ordering::SeqCst) <= 8,
        "{} tokens: the replicas fought",
        idp.latest.load(Ordering::SeqCst)
    );
    // Without the announcement, B sends the revoked token at least once per refresh of A's (and
    // more under concurrent load); with it, only a request racing the announcement can.
    let refreshes = idp.latest.load(Ordering::SeqCst) as usize - 1;
    assert!(
        refused("/b") * 2 <= refreshes,
        "replica B sent a revoked token {} times of {sent}, over {refreshes} refreshes",
        refused("/b")
    );
}

/// After an IdP outage, a replica still backing off takes the token another replica stored, at
/// once, rather than answering 503 until its own retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_in_backoff_takes_the_token_another_stored() {
    let Some(redis) = RedisServer::start(false) else { return };
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let idp = RevokingIdp::start(3600, Duration::ZERO, None).await;
    idp.down.store(true, Ordering::SeqCst);
    let (up, _) = checking_upstream(&idp).await;
    let b = replica(&url, &idp, &up, "limits:\n  warmup_timeout: 0s\n").await;
    // Failures push B's retries seconds apart.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status(&b, "/b").await, 503);
    // Right after one of B's retries failed, its next one is seconds away: the window below
    // (900 ms) then shows B taking A's token, not fetching one itself.
    let waiting = Instant::now();
    while token_state(&b).await["refresh_in_seconds"].as_u64().unwrap_or(0) < 2 {
        assert!(waiting.elapsed() < Duration::from_secs(10), "B's retries never came 2 s apart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    idp.down.store(false, Ordering::SeqCst);
    let a = replica(&url, &idp, &up, "").await;
    wait_ready(&a).await;
    let started = Instant::now();
    while status(&b, "/b").await != 200 {
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "B still answers 503 {:?} after A stored a token",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(idp.latest.load(Ordering::SeqCst), 1, "B fetched a token of its own");
}

/// A token's lifetime counts from when its request was sent (a slow IdP took 2 s to answer),
/// and a JWT's own `exp` wins when it is sooner than `expires_in`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetimes_count_from_the_request_and_a_jwt_exp_wins_when_sooner() {
    let slow = RevokingIdp::start(10, Duration::from_secs(2), None).await;
    let (up, _) = checking_upstream(&slow).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: {up}\n    provider: idp\n",
        slow.addr
    ))
    .await;
    wait_ready(&tg).await;
    let left = token_state(&tg).await["expires_in_seconds"].as_u64().unwrap();
    assert!(left <= 8, "{left} s left of a 10 s token requested 2 s ago");

    let jwts = RevokingIdp::start(3600, Duration::ZERO, Some(30)).await;
    let (up, _) = checking_upstream(&jwts).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: {up}\n    provider: idp\n",
        jwts.addr
    ))
    .await;
    wait_ready(&tg).await;
    let left = token_state(&tg).await["expires_in_seconds"].as_u64().unwrap();
    assert!((25..=30).contains(&left), "{left} s left of a JWT that expires in 30 s");
}

/// An IdP that hangs instead of refusing: a request with no token gets `503 token_unavailable`
/// with `Retry-After: 1` after `limits.token_wait`, not after the IdP timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_idp_gets_a_quick_503() {
    let idp = RevokingIdp::start(3600, Duration::ZERO, None).await;
    idp.hang.store(true, Ordering::SeqCst);
    let (up, _) = checking_upstream(&idp).await;
    let tg = start(&format!(
        "limits:\n  warmup_timeout: 0s\n  token_wait: 500ms\nproviders:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\n    timeout: 30s\nroutes:\n  - prefix: /\n    upstream: {up}\n    provider: idp\n",
        idp.addr
    ))
    .await;
    for n in 0..3 {
        let started = Instant::now();
        let r = client().get(format!("http://{}/{n}", tg.proxy_addr)).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_millis(1200), "took {:?}", started.elapsed());
    }
}

/// What is planted in Redis cannot hurt: a huge value at the token key is not read whole (the
/// replica fetches its own token), an older entry written back and announced is not taken, and
/// a refresh lock without expiry gets one instead of holding every refresh up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_values_are_bounded_generations_only_grow_and_locks_expire() {
    let Some(redis) = RedisServer::start(false) else { return };
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let idp = RevokingIdp::start(3600, Duration::ZERO, None).await;
    let (up, seen) = checking_upstream(&idp).await;
    let a = replica(&url, &idp, &up, "").await;
    wait_ready(&a).await;
    let keys = redis.cli(&["--scan", "--pattern", "tokengate:*"]);
    let token_key = keys.lines().find(|k| k.ends_with(":token")).unwrap().to_owned();
    let lock_key = token_key.replace(":token", ":lock");
    let first = redis.cli(&["GET", &token_key]).trim().to_owned();

    // A newer token from a second replica, then the first one written back and announced.
    let b = replica(&url, &idp, &up, "").await;
    redis.cli(&["DEL", &token_key]);
    b.proxy.runtime.load().providers["idp"].refresh().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&a, "/after-refresh").await, 200, "A did not take B's token");
    let channel = "tokengate:tokens";
    let provider_key = token_key.trim_start_matches("tokengate:").trim_end_matches(":token");
    redis.cli(&["SET", &token_key, &first]);
    redis.cli(&["PUBLISH", channel, provider_key]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&a, "/after-write-back").await, 200, "A went back to a superseded token");

    // A lock without expiry: the refresh does not wait for it, and it gets one.
    redis.cli(&["SET", &lock_key, "planted"]);
    redis.cli(&["DEL", &token_key]);
    let started = Instant::now();
    a.proxy.runtime.load().providers["idp"].refresh().await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500), "the refresh waited {:?}", started.elapsed());
    let ttl: i64 = redis.cli(&["PTTL", &lock_key]).trim().parse().unwrap();
    assert!(ttl > 0, "the planted lock still has no expiry ({ttl})");

    // 48 MiB at the token key: not read whole, so not taken; the replica fetches its own.
    redis.cli(&["DEL", &lock_key]);
    redis.cli(&["SETRANGE", &token_key, &(48 * 1024 * 1024).to_string(), "x"]);
    let calls = idp.calls.load(Ordering::SeqCst);
    let c = replica(&url, &idp, &up, "").await;
    wait_ready(&c).await;
    assert_eq!(status(&c, "/c").await, 200);
    assert_eq!(idp.calls.load(Ordering::SeqCst), calls + 1, "the planted value was taken for a token");
    assert!(seen.lock().unwrap().iter().all(|(p, s)| *s == 200 || p.starts_with("/x")));
}

/// While an outage has taken the token, retries stay a few seconds apart: once the IdP is back,
/// clients get 200 again within seconds, not after a backoff grown to 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_served_within_seconds_of_the_idp_recovering() {
    let idp = RevokingIdp::start(3600, Duration::ZERO, None).await;
    idp.down.store(true, Ordering::SeqCst);
    let (up, _) = checking_upstream(&idp).await;
    let tg = start(&format!(
        "limits:\n  warmup_timeout: 0s\nproviders:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: {up}\n    provider: idp\n",
        idp.addr
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(status(&tg, "/during").await, 503);
    let calls = idp.calls.load(Ordering::SeqCst);
    assert!(calls <= 12, "{calls} IdP calls in 12 s of outage");
    idp.down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    while status(&tg, "/after").await != 200 {
        assert!(
            back.elapsed() < Duration::from_millis(3500),
            "still 503 {:?} after the IdP came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replicas that cannot share tokens (no shared cache, or Redis down) against an IdP that revokes
/// the previous token on every issue revoke each other's tokens: each 401 is a revocation. They
/// replace revoked tokens five in a row, then at most five a second, instead of calling the IdP
/// as fast as requests come (nearly a thousand calls in 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_cannot_share_do_not_flood_the_idp_revoking_each_other() {
    let idp = RevokingIdp::start(3600, Duration::ZERO, None).await;
    let (up, _) = checking_upstream(&idp).await;
    let config = format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: {up}\n    provider: idp\n",
        idp.addr
    );
    let (a, b) = (start(&config).await, start(&config).await);
    wait_ready(&a).await;
    wait_ready(&b).await;
    // Both tokens work once each (so a 401 means revocation), then they fight.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let _ = tokio::join!(status(&a, "/a"), status(&b, "/b"));
    }
    let calls = idp.calls.load(Ordering::SeqCst);
    assert!(calls <= 2 + 2 * (5 + 5 * 4), "{calls} IdP calls in 3 s");
}
