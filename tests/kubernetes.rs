//! Kubernetes semantics: readiness that keeps a Service up through an IdP outage, the shutdown
//! sequence (delay, drain, a second signal), and reloads when mounted files are swapped the
//! way the kubelet swaps them.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A token endpoint that can be switched off, issuing `lifetime` tokens, and remembering the
/// Basic credentials it was sent.
#[derive(Clone)]
struct SwitchIdp {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    auth: Arc<Mutex<Vec<String>>>,
}

impl SwitchIdp {
    async fn start(lifetime_s: u64) -> SwitchIdp {
        let down = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = Arc::new(Mutex::new(Vec::new()));
        let (d, c, a) = (down.clone(), calls.clone(), auth.clone());
        let addr = tokengate::demo::serve_fn(any(), move |req| {
            let (down, calls, auth) = (d.clone(), c.clone(), a.clone());
            async move {
                let req = capture(req).await;
                let n = calls.fetch_add(1, Ordering::SeqCst);
                auth.lock().unwrap().push(req.header("authorization").unwrap_or_default());
                if down.load(Ordering::SeqCst) {
                    return json(503, serde_json::json!({"error": "temporarily_unavailable"}));
                }
                json(200, serde_json::json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": lifetime_s}))
            }
        })
        .await
        .unwrap();
        SwitchIdp { addr, down, calls, auth }
    }

    fn provider(&self, secret_line: &str) -> String {
        format!(
            "providers:\n  idp:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: app\n    {secret_line}\n",
            self.addr
        )
    }

    fn last_basic_secret(&self) -> String {
        use base64::Engine;
        let auth = self.auth.lock().unwrap();
        let basic = auth.last().cloned().unwrap_or_default();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(basic.trim_start_matches("Basic "))
            .unwrap_or_default();
        String::from_utf8_lossy(&raw).split_once(':').map(|(_, s)| s.to_owned()).unwrap_or_default()
    }
}

async fn readyz(admin: SocketAddr, query: &str) -> (u16, serde_json::Value) {
    let r = client().get(format!("http://{admin}/readyz{query}")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test]
async fn readiness_outlives_an_idp_outage_and_strict_readiness_does_not() {
    let idp = SwitchIdp::start(2).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "{}routes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        idp.provider("client_secret: s1"),
        up.url()
    ))
    .await;
    wait_ready(&tg).await;
    idp.down.store(true, Ordering::SeqCst);
    // The 2 s token expires and cannot be replaced.
    eventually("the token expires", Duration::from_secs(5), async || {
        readyz(tg.admin_addr, "").await.1["all_tokens_valid"] == false
    })
    .await;
    let (code, body) = readyz(tg.admin_addr, "").await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ready")), "{body}");
    assert_eq!(body["providers"]["idp"]["ready"], false, "{body}");
    assert!(body["providers"]["idp"]["last_error"].is_string(), "{body}");
    let (code, body) = readyz(tg.admin_addr, "?strict=1").await;
    assert_eq!((code, body["status"].as_str()), (503, Some("tokens_missing")), "{body}");
    // Clients reach tokengate and get its answer, not a connection error.
    let r = client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "token_unavailable");
    assert!(up.requests().is_empty(), "nothing may be forwarded without a token");

    idp.down.store(false, Ordering::SeqCst);
    eventually("strict readiness returns with a token", Duration::from_secs(35), async || {
        readyz(tg.admin_addr, "?strict=1").await.0 == 200
    })
    .await;
    tg.shutdown().await;
}

#[tokio::test]
async fn strict_readiness_can_be_the_default() {
    let idp = SwitchIdp::start(3600).await;
    idp.down.store(true, Ordering::SeqCst);
    let text = format!(
        "listen: {ANY}\naccess_log: off\nadmin:\n  listen: {ANY}\n  strict_readiness: true\nlimits:\n  warmup_timeout: 200ms\n{}routes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: idp\n",
        idp.provider("client_secret: s1")
    );
    let tg = tokengate::server::start(tokengate::config::parse(&text, "test.yaml").unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, body) = readyz(tg.admin_addr, "").await;
    assert_eq!((code, body["strict"].as_bool()), (503, Some(true)), "{body}");
    tg.shutdown().await;
}

#[tokio::test]
async fn warm_up_waits_for_tokens_until_warmup_timeout() {
    let idp = SwitchIdp::start(3600).await;
    idp.down.store(true, Ordering::SeqCst);
    let tg = start(&format!(
        "limits:\n  warmup_timeout: 700ms\n{}routes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: idp\n",
        idp.provider("client_secret: s1")
    ))
    .await;
    let (code, body) = readyz(tg.admin_addr, "").await;
    assert_eq!((code, body["status"].as_str()), (503, Some("warming_up")), "{body}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(readyz(tg.admin_addr, "").await.0, 503, "ready before the warm-up timeout");
    eventually("ready after the warm-up timeout", Duration::from_secs(3), async || {
        readyz(tg.admin_addr, "").await.0 == 200
    })
    .await;
    tg.shutdown().await;

    // With a working IdP the warm-up ends as soon as the token is there.
    let idp = SwitchIdp::start(3600).await;
    let tg = start(&format!(
        "limits:\n  warmup_timeout: 1h\n{}routes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: idp\n",
        idp.provider("client_secret: s1")
    ))
    .await;
    wait_ready(&tg).await;
    tg.shutdown().await;
}

/// The real binary with one route `/` to `up` and these `limits:` lines, ready; its proxy
/// address and its directory (removed on drop).
async fn spawn_ready(idp: &SwitchIdp, limits: &str, up: &str) -> (Process, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tg.yaml");
    let (proxy, admin) = (closed_port(), closed_port());
    std::fs::write(
        &path,
        format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\nlimits:\n{limits}{}routes:\n  - prefix: /\n    upstream: {up}\n    provider: idp\n",
            idp.provider("client_secret: s1")
        ),
    )
    .unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;
    (p, proxy, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_unready_keeps_accepting_for_the_delay_then_drains() {
    let idp = SwitchIdp::start(3600).await;
    let up = Upstream::start(None).await;
    let limits = "  shutdown_delay: 1500ms\n  shutdown_grace: 5s\n";
    let (mut p, proxy, _dir) = spawn_ready(&idp, limits, &up.url()).await;
    let admin = p.admin;
    let sent = std::time::Instant::now();
    p.signal("-TERM");
    eventually("unready after SIGTERM", Duration::from_millis(500), async || {
        readyz(admin, "").await.0 == 503
    })
    .await;
    assert_eq!(readyz(admin, "").await.1["status"], "shutting_down");
    // New connections are still accepted and served during the delay.
    for i in 0..3 {
        let r = fresh_client().get(format!("http://{proxy}/during-delay/{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent.elapsed() < Duration::from_millis(1500), "the test itself was too slow");
    let code = p.exited_within(Duration::from_secs(5)).await.expect("did not exit after the delay");
    assert_eq!(code, Some(0));
    assert!(sent.elapsed() >= Duration::from_millis(1500), "exited before shutdown_delay");
    assert_eq!(up.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let idp = SwitchIdp::start(3600).await;
    let slow = Upstream::start_with(None, Duration::from_secs(20)).await;
    for second in ["-TERM", "-INT"] {
        let (mut p, proxy, _dir) = spawn_ready(&idp, "  shutdown_grace: 30s\n", &slow.url()).await;
        let pending = tokio::spawn(async move { client().get(format!("http://{proxy}/slow")).send().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.signal("-TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(p.child.try_wait().unwrap().is_none(), "the first signal must drain, not exit");
        p.signal(second);
        let code = p.exited_within(Duration::from_secs(2)).await;
        assert_eq!(code, Some(Some(1)), "a second {second} must exit at once; log:\n{}", p.log_text());
        assert!(p.log_text().contains("second signal"), "{}", p.log_text());
        pending.abort();
    }
}

/// A directory laid out as the kubelet mounts a ConfigMap or Secret: `name -> ..data/name`,
/// `..data -> ..<version>/`. [`KubeMount::update`] swaps `..data` atomically, as the kubelet does.
struct KubeMount {
    dir: PathBuf,
    version: usize,
}

impl KubeMount {
    fn new(dir: &Path, files: &[(&str, &str)]) -> KubeMount {
        std::fs::create_dir_all(dir).unwrap();
        let mut m = KubeMount { dir: dir.to_path_buf(), version: 0 };
        m.write_version(files);
        std::os::unix::fs::symlink(m.version_dir(), dir.join("..data")).unwrap();
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        }
        m
    }

    fn version_dir(&self) -> String {
        format!("..2026_12_02_{:02}", self.version)
    }

    fn write_version(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let d = self.dir.join(self.version_dir());
        std::fs::create_dir(&d).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        let old = self.dir.join(self.version_dir());
        self.write_version(files);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(self.version_dir(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(old).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

async fn metric(admin: SocketAddr, line: &str) -> bool {
    let text = client().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_swap_reloads_and_a_broken_one_keeps_the_running_config() {
    let idp = SwitchIdp::start(3600).await;
    let (a, b) = (Upstream::start(None).await, Upstream::start(None).await);
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (closed_port(), closed_port());
    let config = |routes: &str| {
        format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\n{}routes:\n{routes}",
            idp.provider("client_secret: s1")
        )
    };
    let route = |prefix: &str, up: &Upstream| {
        format!("  - prefix: {prefix}\n    upstream: {}\n    provider: idp\n", up.url())
    };
    let mut mount =
        KubeMount::new(&dir.path().join("config"), &[("tokengate.yaml", &config(&route("/a", &a)))]);
    let p = Process::spawn(&mount.path("tokengate.yaml"), admin);
    p.ready().await;
    let status = async |path: &str| {
        client().get(format!("http://{proxy}{path}")).send().await.unwrap().status().as_u16()
    };
    assert_eq!(status("/b/1").await, 404);

    mount.update(&[("tokengate.yaml", &config(&format!("{}{}", route("/a", &a), route("/b", &b))))]);
    eventually("the new route is served without a signal", Duration::from_secs(5), async || {
        status("/b/1").await == 200
    })
    .await;
    assert!(metric(admin, r#"tokengate_config_reloads_total{result="success"} 1"#).await);

    mount.update(&[("tokengate.yaml", "routes: [this is: not valid\n")]);
    eventually("the failed reload is counted", Duration::from_secs(5), async || {
        metric(admin, r#"tokengate_config_reloads_total{result="failure"} 1"#).await
    })
    .await;
    assert_eq!(status("/b/2").await, 200, "the running configuration must stay");
    p.logged("reload failed").await;
    assert_eq!(idp.calls.load(Ordering::SeqCst), 1, "an unchanged provider keeps its token");
    // An event that changes no content (a touch) reloads nothing.
    let before = p.log_text().matches("configuration reloaded").count();
    let real = std::fs::canonicalize(mount.path("tokengate.yaml")).unwrap();
    let text = std::fs::read(&real).unwrap();
    std::fs::write(&real, text).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(p.log_text().matches("configuration reloaded").count(), before);
}

/// One route at `prefix` to `up`, its provider's client secret read from the file `secret`.
fn secret_file_config(
    proxy: SocketAddr,
    admin: SocketAddr,
    idp: &SwitchIdp,
    secret: &Path,
    prefix: &str,
    up: &Upstream,
) -> String {
    format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\n{}routes:\n  - prefix: {prefix}\n    upstream: {}\n    provider: idp\n",
        idp.provider(&format!("client_secret_file: {}", secret.display())),
        up.url()
    )
}

/// Read system calls the process has made (`syscr` in `/proc/<pid>/io`).
fn read_calls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("syscr: ")).unwrap().trim().parse().unwrap()
}

/// Comparing the watched files means opening and reading them, and an open is itself an inotify
/// event in the watched directory. A watcher that reacts to that reads its files again, and
/// again, for as long as it runs. Idle, with a secret in a mounted Secret and the log written
/// beside the configuration, it must read nothing; a real change must still reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watcher_does_not_reread_its_own_files() {
    let idp = SwitchIdp::start(3600).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = KubeMount::new(&dir.path().join("secrets"), &[("client-secret", "the-secret\n")]);
    let (proxy, admin) = (closed_port(), closed_port());
    let path = dir.path().join("tg.yaml");
    let config =
        |prefix: &str| secret_file_config(proxy, admin, &idp, &secrets.path("client-secret"), prefix, &up);
    std::fs::write(&path, config("/a")).unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;
    // Past the start-up reads and one debounce period.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = read_calls(p.child.id());
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let reads = read_calls(p.child.id()) - before;
    assert!(reads < 4, "{reads} read calls in 2 s while idle: the watcher is re-reading its files");

    std::fs::write(&path, config("/b")).unwrap();
    eventually("the changed configuration is served", Duration::from_secs(5), async || {
        client().get(format!("http://{proxy}/b/1")).send().await.unwrap().status() == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_file_is_used_by_the_next_token_fetch() {
    let idp = SwitchIdp::start(3600).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = KubeMount::new(&dir.path().join("secrets"), &[("client-secret", "first-secret\n")]);
    let mut secrets = secrets;
    let (proxy, admin) = (closed_port(), closed_port());
    let path = dir.path().join("tg.yaml");
    std::fs::write(&path, secret_file_config(proxy, admin, &idp, &secrets.path("client-secret"), "/", &up))
        .unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;
    assert_eq!(idp.last_basic_secret(), "first-secret");
    secrets.update(&[("client-secret", "second-secret\n")]);
    eventually("the rotated secret is used", Duration::from_secs(5), async || {
        idp.last_basic_secret() == "second-secret"
    })
    .await;
    assert_eq!(client().get(format!("http://{proxy}/x")).send().await.unwrap().status(), 200);
    let log = p.log_text();
    assert!(!log.contains("first-secret") && !log.contains("second-secret"), "a secret was logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_tls_certificate_serves_new_handshakes_and_open_connections_stay() {
    let idp = SwitchIdp::start(3600).await;
    let up = Upstream::start(None).await;
    let (old, new) = (pki(), pki());
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let mut certs = KubeMount::new(
        &dir.path().join("tls"),
        &[("tls.crt", &read(&old.server_cert)), ("tls.key", &read(&old.server_key))],
    );
    let (proxy, admin, tls) = (closed_port(), closed_port(), closed_port());
    let path = dir.path().join("tg.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\ntls:\n  listen: {tls}\n  cert_file: {}\n  key_file: {}\n{}routes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
            certs.path("tls.crt").display(),
            certs.path("tls.key").display(),
            idp.provider("client_secret: s1"),
            up.url()
        ),
    )
    .unwrap();
    let p = Process::spawn(&path, admin);
    p.ready().await;
    let url = format!("https://127.0.0.1:{}/x", tls.port());
    let trusts_old = tls_client(&old.ca_pem, None);
    assert_eq!(trusts_old.get(&url).send().await.unwrap().status(), 200);

    certs.update(&[("tls.crt", &read(&new.server_cert)), ("tls.key", &read(&new.server_key))]);
    let trusts_new = tls_client(&new.ca_pem, None);
    eventually("new handshakes present the new certificate", Duration::from_secs(5), async || {
        trusts_new.get(&url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    // The connection opened before the swap still serves (a new one from this client would
    // fail: it does not trust the new certificate).
    assert_eq!(trusts_old.get(&url).send().await.unwrap().status(), 200);
    assert!(
        tls_client(&old.ca_pem, None).get(&url).send().await.is_err(),
        "the old certificate is still served"
    );
    p.logged("configuration reloaded").await;
}
