//! Reloads that never take service down: a changed provider is switched in only once it has a
//! token (the routes keep their previous one meanwhile), and reading the file never stalls the
//! admin listener (a FIFO, a pathologically nested file). Each test drives the real binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// An IdP that issues `<prefix>-<n>` tokens, or answers 503 while `down`.
struct ToggleIdp {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl ToggleIdp {
    async fn start(prefix: &'static str, down: bool) -> ToggleIdp {
        let (down, calls) = (Arc::new(AtomicBool::new(down)), Arc::new(AtomicUsize::new(0)));
        let (d, c) = (down.clone(), calls.clone());
        let addr = tokengate::demo::serve_fn(any(), move |_req| {
            let (down, calls) = (d.clone(), c.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if down.load(Ordering::SeqCst) {
                    return json(503, serde_json::json!({"error": "temporarily_unavailable"}));
                }
                json(200, serde_json::json!({"access_token": format!("{prefix}-{n}"), "token_type": "Bearer", "expires_in": 3600}))
            }
        })
        .await
        .unwrap();
        ToggleIdp { addr, down, calls }
    }
}

fn provider(name: &str, token_url: &str) -> String {
    format!(
        "  {name}:\n    type: oauth2\n    token_url: {token_url}\n    client_id: app\n    client_secret: s\n"
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    up: Upstream,
    p: Process,
}

impl Setup {
    async fn start(providers: &str, route_provider: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokengate.yaml");
        let (proxy, admin) = (closed_port(), closed_port());
        let up = Upstream::start(None).await;
        std::fs::write(&path, config_text(proxy, admin, &up, providers, route_provider)).unwrap();
        let p = Process::spawn(&path, admin);
        p.ready().await;
        Setup { _dir: dir, path, proxy, admin, up, p }
    }

    fn write(&self, providers: &str, route_provider: &str) {
        std::fs::write(&self.path, config_text(self.proxy, self.admin, &self.up, providers, route_provider))
            .unwrap();
    }

    /// `POST /reload`: its status and body.
    async fn reload(&self) -> (u16, String) {
        let r = client().post(format!("http://{}/reload", self.admin)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The token the upstream saw on a request to `/a`.
    async fn token(&self) -> String {
        let r = client().get(format!("http://{}/a/x", self.proxy)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        self.up.requests().pop().unwrap().header("authorization").unwrap()
    }

    async fn readyz(&self) -> serde_json::Value {
        client().get(format!("http://{}/readyz", self.admin)).send().await.unwrap().json().await.unwrap()
    }

    async fn reloads(&self, result: &str) -> u64 {
        let series = format!("tokengate_config_reloads_total{{result=\"{result}\"}}");
        metric_value(self.admin, &series).await.unwrap_or(0.0) as u64
    }
}

/// One route `/a` to `up` with `route_provider`'s token; reloads only when asked.
fn config_text(
    proxy: SocketAddr,
    admin: SocketAddr,
    up: &Upstream,
    providers: &str,
    route_provider: &str,
) -> String {
    format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\n  reload: true\naccess_log: off\nwatch: false\nproviders:\n{providers}routes:\n  - prefix: /a\n    upstream: {}\n    provider: {route_provider}\n",
        up.url()
    )
}

/// A provider changed to one that cannot get a token (an IdP that is down, a typo in the URL)
/// does not take its route down: the route keeps the previous provider, the reload is reported
/// as failed, and once the new provider gets a token the route switches to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_provider_is_switched_in_only_once_it_has_a_token() {
    let old = ToggleIdp::start("old", false).await;
    let new = ToggleIdp::start("new", true).await;
    let s = Setup::start(&provider("idp", &format!("http://{}/token", old.addr)), "idp").await;
    assert_eq!(s.token().await, "Bearer old-0");

    // The same provider name, now at an IdP that is down.
    s.write(&provider("idp", &format!("http://{}/token", new.addr)), "idp");
    let (status, body) = s.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(s.token().await, "Bearer old-0", "the route kept its previous provider");
    let ready = s.readyz().await;
    assert!(ready["warming"]["idp"].as_str().is_some_and(|e| e.contains("503")), "{ready}");
    assert_eq!(s.reloads("failure").await, 1);
    s.p.logged("configuration reloaded, except: provider idp has no token").await;

    // The IdP comes back: the route switches to the new provider by itself.
    new.down.store(false, Ordering::SeqCst);
    let started = Instant::now();
    let mut token = String::new();
    while started.elapsed() < Duration::from_secs(15) {
        token = s.token().await;
        if token.starts_with("Bearer new-") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(token.starts_with("Bearer new-"), "still {token} after {:?}", started.elapsed());
    assert!(s.readyz().await.get("warming").is_none());
    assert!(new.calls.load(Ordering::SeqCst) >= 2);
}

/// A route pointed at another provider that cannot get a token keeps the one it had; a
/// provider that is typed wrong (a closed port) fails the reload the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_moved_to_a_provider_without_a_token_keeps_its_previous_one() {
    let good = ToggleIdp::start("good", false).await;
    let providers = |b_url: String| {
        format!("{}{}", provider("a", &format!("http://{}/token", good.addr)), provider("b", &b_url))
    };
    let dead = format!("http://{}/token", closed_port());
    let s = Setup::start(&providers(format!("http://{}/token", good.addr)), "a").await;
    assert_eq!(s.token().await, "Bearer good-0");
    s.write(&providers(dead), "b");
    let (status, body) = s.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(s.token().await, "Bearer good-0", "the route kept provider a");
    assert!(s.readyz().await["warming"]["b"].is_string());
    // A later reload that fixes it applies cleanly and clears the warning.
    s.write(&providers(format!("http://{}/token", good.addr)), "b");
    let (status, body) = s.reload().await;
    assert_eq!(status, 200, "{body}");
    assert!(s.token().await.starts_with("Bearer good-"));
    assert!(s.readyz().await.get("warming").is_none());
}

/// How long `/healthz` takes to answer, at worst, over `period`.
async fn slowest_healthz(admin: SocketAddr, period: Duration) -> Duration {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < period {
        let asked = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client().get(format!("http://{admin}/healthz")).send(),
        )
        .await;
        assert!(matches!(r, Ok(Ok(ref r)) if r.status() == 200), "/healthz failed: {r:?}");
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slowest
}

/// Reading the file never stalls the admin listener: a configuration path swapped for a FIFO
/// is refused (not read, which would block until someone writes to it), and so is a file of
/// pathologically nested flow collections (120 KB took the parser seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_file_never_stalls_the_admin_listener() {
    let idp = ToggleIdp::start("t", false).await;
    let s = Setup::start(&provider("idp", &format!("http://{}/token", idp.addr)), "idp").await;
    let text = std::fs::read_to_string(&s.path).unwrap();
    let nested = format!("{text}x: {}{}\n", "[".repeat(60_000), "]".repeat(60_000));
    std::fs::write(&s.path, nested).unwrap();
    let (status, body) = s.reload().await;
    assert_eq!(status, 422, "{body}");
    s.p.logged("nest more than 64 levels").await;

    std::fs::remove_file(&s.path).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&s.path).status().unwrap();
    assert!(made.success());
    s.p.signal("-HUP");
    let reload = tokio::spawn({
        let admin = s.admin;
        async move { client().post(format!("http://{admin}/reload")).send().await.unwrap().status().as_u16() }
    });
    let slowest = slowest_healthz(s.admin, Duration::from_secs(1)).await;
    assert!(slowest < Duration::from_millis(500), "/healthz took {slowest:?}");
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), reload).await.unwrap().unwrap(), 422);
    s.p.logged("not a regular file (a FIFO)").await;
    assert_eq!(s.token().await, "Bearer t-0", "the running configuration stays");
    assert_eq!(s.reloads("failure").await, 3);
}
