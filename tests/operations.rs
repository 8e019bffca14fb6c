//! Day-one operations: shared token cache across processes, forward-proxy mode, token status,
//! access log, and the Kubernetes and Grafana files matching the code.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::redis::{REDIS_PASSWORD, REDIS_USER, RedisServer};
use std::time::Duration;

use common::*;

struct Replica {
    child: Child,
    proxy: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CACHE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A replica using `shared_cache` (the YAML lines under it).
fn spawn_replica(dir: &std::path::Path, name: &str, idp: &Idp, up: &Upstream, shared_cache: &str) -> Replica {
    let (proxy, admin) = (closed_port(), closed_port());
    let config = format!(
        "listen: {proxy}\nadmin:\n  listen: {admin}\nshared_cache:\n{shared_cache}  key: {CACHE_KEY}\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        idp.token_url(),
        up.url()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["run", "-c", path.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Replica { child, proxy, log }
}

/// Requests through both replicas for `run`; the number answered 200. Anything else fails the
/// test after the first second (start-up).
async fn load(replicas: [&Replica; 2], run: Duration) -> usize {
    let c = client();
    let started = std::time::Instant::now();
    let mut ok = 0;
    while started.elapsed() < run {
        for r in replicas {
            if let Ok(resp) = c.get(format!("http://{}/x", r.proxy)).send().await {
                assert!(
                    resp.status() == 200 || started.elapsed() < Duration::from_secs(1),
                    "{}",
                    resp.status()
                );
                ok += usize::from(resp.status() == 200);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_token_over_tls_as_an_acl_user_and_survive_redis_going_away() {
    let Some(mut redis) = RedisServer::start(true) else { return };
    let ca = redis.tls.as_ref().unwrap().ca.display().to_string();
    // 4 s tokens refresh about every 2 s.
    let idp = Idp::start(IdpOptions { lifetime: Duration::from_secs(4), ..Default::default() }).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    // One replica has the password in a file, the other percent-encoded in the URL.
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{REDIS_PASSWORD}\n")).unwrap();
    let a = spawn_replica(
        dir.path(),
        "a",
        &idp,
        &up,
        &format!(
            "  redis: rediss://{REDIS_USER}@localhost:{}/0\n  password_file: {}\n  ca_file: {ca}\n",
            redis.port,
            password_file.display()
        ),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = spawn_replica(
        dir.path(),
        "b",
        &idp,
        &up,
        &format!("  redis: rediss://{REDIS_USER}:p%3Aw%40rd%2Fx@127.0.0.1:{}\n  ca_file: {ca}\n", redis.port),
    );
    let ok = load([&a, &b], Duration::from_secs(7)).await;
    assert!(ok > 100, "only {ok} successful requests");
    // One replica alone fetches about 4 times in 7 s; two without sharing would fetch about 8.
    assert!(idp.calls() <= 5, "the IdP saw {} fetches for two replicas", idp.calls());
    for r in [&a, &b] {
        let log = std::fs::read_to_string(&r.log).unwrap();
        assert!(!log.contains("shared token cache unavailable"), "a replica could not use Redis:\n{log}");
        assert!(
            !log.contains(REDIS_PASSWORD) && !log.contains("p%3Aw%40rd"),
            "the Redis password was logged"
        );
    }
    // Tokens are encrypted at rest, under a key named by a digest, not by the settings.
    let keys = redis.cli(&["--scan", "--pattern", "tokengate:*"]);
    let token_key =
        keys.lines().find(|k| k.ends_with(":token")).unwrap_or_else(|| panic!("no token key in {keys:?}"));
    let digest = token_key.trim_start_matches("tokengate:idp:").trim_end_matches(":token");
    assert!(digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{token_key}");
    let stored = redis.cli(&["GET", token_key]);
    assert!(stored.len() > 40, "nothing stored: {stored:?}");
    for issued in idp.issued.lock().unwrap().keys() {
        assert!(!stored.contains(issued.as_str()), "plaintext token in Redis");
    }
    assert!(!stored.contains("secret-1"));

    // Redis goes away: both replicas keep serving with their own fetches.
    redis.stop();
    let calls = idp.calls();
    let ok = load([&a, &b], Duration::from_secs(6)).await;
    assert!(ok > 80, "only {ok} successful requests without Redis");
    assert!(idp.calls() > calls, "no replica fetched a token on its own");
}

#[tokio::test]
async fn unreachable_redis_falls_back_to_own_fetches() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let tg = start(&format!(
        "shared_cache:\n  redis: redis://127.0.0.1:{}\n  key: {CACHE_KEY}\n  timeout: 200ms\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        closed_port().port(),
        idp.token_url(),
        up.url()
    ))
    .await;
    assert_eq!(client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap().status(), 200);
    assert_eq!(idp.calls(), 1);
}

/// curl is the HTTP_PROXY client these tests use; `.ci/run` installs it.
fn have_curl() -> bool {
    let ok = Command::new("curl").arg("--version").output().is_ok();
    if !ok {
        skipped("curl", "apt-get install curl");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_mode_serves_configured_hosts_only() {
    if !have_curl() {
        return;
    }
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let other = Upstream::start(None).await;
    let tg = start(&format!(
        "forward_proxy:\n  listen: 127.0.0.1:0\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n",
        idp.token_url(),
        up.url()
    ))
    .await;
    let fwd = tg.forward_addr.unwrap();
    let curl = move |url: String| {
        let out = Command::new("curl")
            .args(["-s", "-i", "--noproxy", "", "--proxy", &format!("http://{fwd}"), &url])
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ok = tokio::task::spawn_blocking({
        let url = format!("{}/v1/users?page=2", up.url());
        move || curl(url)
    })
    .await
    .unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let seen = &up.requests()[0];
    assert_eq!((seen.path.as_str(), seen.query.as_deref()), ("/v1/users", Some("page=2")));
    assert!(idp.valid(&seen.header("authorization").unwrap()));
    let refused = tokio::task::spawn_blocking({
        let url = format!("{}/x", other.url());
        move || curl(url)
    })
    .await
    .unwrap();
    assert!(refused.starts_with("HTTP/1.1 404") && refused.contains("no_route"), "{refused}");
    assert!(other.requests().is_empty(), "tokengate acted as an open proxy");
    let connect =
        raw(fwd, format!("CONNECT {} HTTP/1.1\r\nHost: localhost\r\n\r\n", up.addr).as_bytes()).await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    // The regular listener still refuses absolute-form targets.
    let plain = raw(
        tg.proxy_addr,
        format!("GET {}/v1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", up.url()).as_bytes(),
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_takes_the_api_key_from_proxy_credentials() {
    if !have_curl() {
        return;
    }
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let key = "fwd-key-0123456789abcdef";
    let tg = start(&format!(
        "forward_proxy:\n  listen: 127.0.0.1:0\naccess:\n  api_keys:\n    keys: [{key}]\n{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n",
        idp.provider_yaml(),
        up.url()
    ))
    .await;
    let fwd = tg.forward_addr.unwrap();
    let url = format!("{}/v1/x", up.url());
    let status = move |user: Option<&'static str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--proxy", &format!("http://{fwd}")]);
        if let Some(u) = user {
            cmd.args(["--proxy-user", u]);
        }
        String::from_utf8(cmd.arg(&url).output().unwrap().stdout).unwrap()
    };
    let (without, wrong, right) = tokio::task::spawn_blocking(move || {
        (
            status(None),
            status(Some("app:wrong-key-000000000000")),
            status(Some("app:fwd-key-0123456789abcdef")),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (without.as_str(), wrong.as_str(), right.as_str()),
        ("407", "407", "200"),
        "the forward-proxy listener asks for proxy credentials"
    );
    assert_eq!(up.requests().len(), 1);
    assert!(up.requests()[0].header("proxy-authorization").is_none(), "proxy credentials leaked upstream");
}

#[tokio::test]
async fn tokens_endpoint_reports_state_without_token_values() {
    let idp = Idp::start(IdpOptions::default()).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\n  down:\n    type: oauth2\n    token_url: http://{}/token\n    client_id: c\n    client_secret: s\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: idp\n",
        idp.token_url(),
        closed_port()
    ))
    .await;
    wait_for_token(&tg).await;
    let text =
        client().get(format!("http://{}/tokens", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["providers"]["idp"]["state"], "valid");
    assert_eq!(v["providers"]["idp"]["fetches_ok"], 1);
    assert!(v["providers"]["idp"]["expires_in_seconds"].as_u64().unwrap() > 3500);
    assert_eq!(v["providers"]["down"]["state"], "failing");
    assert!(v["providers"]["down"]["last_error"].as_str().unwrap().contains("cannot reach"));
    for token in idp.issued.lock().unwrap().keys() {
        assert!(!text.contains(token.as_str()));
    }
    assert!(!text.contains("secret-1"));
}

async fn wait_for_token(tg: &tokengate::server::Running) {
    for _ in 0..200 {
        let v: serde_json::Value = client()
            .get(format!("http://{}/tokens", tg.admin_addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["providers"]["idp"]["state"] == "valid" && v["providers"]["down"]["state"] == "failing" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request_without_query_or_token() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (closed_port(), closed_port());
    let path = dir.path().join("tg.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\nproviders:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - name: api\n    prefix: /api\n    upstream: {}\n    provider: idp\n",
            idp.token_url(),
            up.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["--log-format", "json", "run", "-c", path.to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let c = client();
    wait_ready_at(admin).await;
    let sent = c
        .post(format!("http://{proxy}/api/users?token=query-secret"))
        .header("user-agent", "legacy-app/1.0 \"quoted\"")
        .header("x-request-id", "req-42")
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    assert_eq!(h2_client().get(format!("http://{proxy}/nowhere")).send().await.unwrap().status(), 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    // The access log follows --log-format: one JSON object per line, beside tracing's own lines.
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["status"].is_u64())
        .collect();
    assert_eq!(access.len(), 2, "{text}");
    let f = &access[0];
    assert_eq!(f["method"], "POST");
    assert_eq!(f["protocol"], "HTTP/1.1");
    assert_eq!(f["user_agent"], "legacy-app/1.0 \"quoted\"");
    assert_eq!(f["bytes_in"], 12);
    assert_eq!(f["request_id"], "req-42");
    let upstream_ms = f["upstream_ms"].as_f64().unwrap();
    assert!(upstream_ms > 0.0 && upstream_ms <= f["duration_ms"].as_f64().unwrap(), "{f}");
    assert_eq!(access[1]["protocol"], "HTTP/2");
    assert!(access[1]["upstream_ms"].is_null(), "nothing was sent upstream");
    assert_eq!(f["route"], "api");
    assert_eq!(f["path"], "/api/users");
    assert_eq!(f["status"], 200);
    assert_eq!(f["provider"], "idp");
    assert_eq!(f["upstream"], up.url());
    assert!(f["duration_ms"].as_f64().is_some());
    assert_eq!(access[1]["status"], 404);
    assert_eq!(access[1]["route"], "_unmatched");
    assert!(!text.contains('\u{1b}'), "colour codes in a log that is not a terminal");
    assert!(!text.contains("query-secret"));
    for token in idp.issued.lock().unwrap().keys() {
        assert!(!text.contains(token.as_str()));
    }
}

fn yaml_docs(path: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_norway::Deserializer::from_str(&text).map(|d| serde_json::Value::deserialize(d).unwrap()).collect()
}

#[test]
fn kubernetes_manifests_match_the_code() {
    let deployment = &yaml_docs("deploy/kubernetes/deployment.yaml")[0];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let port = |name: &str| {
        container["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
    assert!(container["resources"]["requests"].is_object());
    // ConfigMap and Secret updates reach the pod only through directory mounts.
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().all(|m| m["subPath"].is_null()), "subPath mounts never see updates");
    let config_dir = mounts.iter().find(|m| m["name"] == "config").unwrap()["mountPath"].as_str().unwrap();
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&format!("{config_dir}/tokengate.yaml").as_str()), "{args:?}");
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap();

    let configmap = &yaml_docs("deploy/kubernetes/configmap.yaml")[0];
    let text = configmap["data"]["tokengate.yaml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = ["coreview-client-secret", "api-keys", "cache-key"];
    for s in secrets {
        let value = if s == "cache-key" {
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        } else {
            "placeholder-0123456789abcdef"
        };
        std::fs::write(dir.path().join(s), value).unwrap();
    }
    let text = text.replace("/etc/tokengate/secrets", dir.path().to_str().unwrap());
    let config = tokengate::config::env::with_lookup(
        |name| match name {
            "TOKENGATE_REDIS_URL" => Some("redis://redis:6379".into()),
            _ => Some("placeholder".into()),
        },
        || tokengate::config::parse(&text, "configmap.yaml"),
    )
    .unwrap();
    assert_eq!(u64::from(config.listen.port()), port("proxy"));
    assert_eq!(u64::from(config.admin.listen.port()), port("admin"));
    // The whole shutdown sequence fits in the grace period the kubelet gives.
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    let sequence = pre_stop + config.limits.shutdown_delay.as_secs() + config.limits.shutdown_grace.as_secs();
    assert!(sequence < grace, "preStop + shutdown_delay + shutdown_grace = {sequence}s >= {grace}s");
    assert!(config.watch);

    // The proxy Service does not publish the admin port; a metrics-only Service does, and the
    // NetworkPolicy admits only the scraper to it.
    let services = yaml_docs("deploy/kubernetes/service.yaml");
    let targets = |s: &serde_json::Value| -> Vec<String> {
        s["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["targetPort"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(targets(&services[0]), ["proxy"]);
    assert_eq!(targets(&services[1]), ["admin"]);
    let monitor = &yaml_docs("deploy/kubernetes/servicemonitor.yaml")[0];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &services[1]["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the metrics Service"
        );
    }
    let policy = &yaml_docs("deploy/kubernetes/networkpolicy.yaml")[0];
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let admin_rules: Vec<_> = rules.iter().filter(|r| r["ports"][0]["port"] == "admin").collect();
    assert_eq!(admin_rules.len(), 1);
    assert_eq!(
        admin_rules[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "prometheus"
    );
    assert!(rules.iter().all(|r| r["ports"].as_array().unwrap().len() == 1));
    let secret_docs = yaml_docs("deploy/kubernetes/secret.yaml");
    for s in secrets {
        assert!(secret_docs[0]["stringData"][s].is_string(), "{s} missing from the Secret");
    }
    for doc in ["pdb.yaml", "hpa.yaml", "servicemonitor.yaml"] {
        let d = &yaml_docs(&format!("deploy/kubernetes/{doc}"))[0];
        assert!(d["kind"].is_string() && d["spec"].is_object(), "{doc}");
    }
    assert_eq!(
        yaml_docs("deploy/kubernetes/servicemonitor.yaml")[0]["spec"]["endpoints"][0]["path"],
        "/metrics"
    );
}

#[tokio::test]
async fn probe_paths_and_dashboard_metrics_exist() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&format!(
        "providers:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: idp\n",
        idp.token_url(),
        up.url()
    ))
    .await;
    wait_ready(&tg).await;
    let c = client();
    for path in ["/healthz", "/readyz", "/tokens", "/metrics"] {
        assert_eq!(
            c.get(format!("http://{}{path}", tg.admin_addr)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    let names = tg.proxy.metrics.names();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tokengate.json"))
            .unwrap(),
    )
    .unwrap();
    let mut used = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tokengate_"))
            {
                let family = word.trim_end_matches("_bucket");
                assert!(names.iter().any(|n| n == family), "dashboard uses unknown metric {word}");
                used += 1;
            }
        }
    }
    assert!(used >= 10);
}

/// `promtool` at `args`, from `deploy/prometheus`; required in CI, a loud skip elsewhere.
fn promtool(args: &[&str]) -> Option<String> {
    let dir = format!("{}/deploy/prometheus", env!("CARGO_MANIFEST_DIR"));
    let Ok(out) = Command::new("promtool").args(args).current_dir(dir).output() else {
        skipped("promtool", "apt-get install prometheus");
        return None;
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    Some(text)
}

#[test]
fn alert_rules_pass_promtool_and_the_prometheusrule_carries_them() {
    let rules = &yaml_docs("deploy/prometheus/rules.yaml")[0];
    let crd = &yaml_docs("deploy/kubernetes/prometheusrule.yaml")[0];
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(crd["spec"]["groups"], rules["groups"], "prometheusrule.yaml and rules.yaml differ");
    // Every metric an alert uses is one tokengate exports.
    let names = tokengate::metrics::Metrics::new().names().to_vec();
    let exprs: Vec<&str> =
        rules["groups"][0]["rules"].as_array().unwrap().iter().map(|r| r["expr"].as_str().unwrap()).collect();
    assert!(exprs.len() >= 4);
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tokengate_") {
                assert!(names.iter().any(|n| n == word), "{word} is not exported");
            }
        }
    }
    if let Some(out) = promtool(&["check", "rules", "rules.yaml"]) {
        assert!(out.contains("SUCCESS"), "{out}");
        promtool(&["test", "rules", "rules.test.yaml"]);
    }
}

/// The refresh time the overdue alert watches lies between now and the token's expiry.
#[tokio::test]
async fn the_refresh_time_is_exported_between_now_and_expiry() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let tg = start(&idp.config_to(&up.url())).await;
    let r = client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let refresh = metric_value(tg.admin_addr, "tokengate_token_refresh_timestamp_seconds{provider=\"idp\"}")
        .await
        .unwrap();
    let expiry = metric_value(tg.admin_addr, "tokengate_token_expiry_timestamp_seconds{provider=\"idp\"}")
        .await
        .unwrap();
    assert!(now < refresh && refresh < expiry, "now {now}, refresh {refresh}, expiry {expiry}");
    tg.shutdown().await;
}
