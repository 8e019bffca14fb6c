//! The access log: one line per request, written off the request path to stderr or a file that
//! logrotate can move (SIGUSR1), never losing lines under normal load.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> u64 {
    let m = client().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_line_across_workers_and_none_is_lost() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let yaml = format!(
        "listen: {ANY}\nadmin:\n  listen: {ANY}\naccess_log:\n  to: {}\n  format: text\n{}",
        file.display(),
        idp.config_to(&up.url())
    );
    let config = tokengate::config::parse(&yaml, "test.yaml").unwrap();
    let workers = tokengate::server::Workers::Threads(std::num::NonZeroUsize::new(2).unwrap());
    let tg = tokengate::server::start_with(config, None, workers).await.unwrap();
    wait_ready(&tg).await;
    // 40 clients x 50 requests, some unmatched paths and refused methods among them.
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..40 {
        let url = format!("http://{}", tg.proxy_addr);
        tasks.spawn(async move {
            let client = client();
            for i in 0..50 {
                let r = if i % 10 == 9 {
                    client
                        .request(reqwest::Method::from_bytes(b"TRACE").unwrap(), format!("{url}/t/{c}"))
                        .send()
                } else {
                    client.get(format!("{url}/c{c}/r{i}?secret=q")).send()
                };
                assert!(r.await.unwrap().status().as_u16() > 0);
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    tg.shutdown().await;
    let written = lines(&file);
    assert_eq!(written.len(), 2000, "one line per request");
    assert_eq!(written.iter().filter(|l| l.contains("\"TRACE /t/")).count(), 200);
    assert!(written.iter().all(|l| !l.contains("secret=q") && !l.contains('\u{1b}')));
}

#[tokio::test]
async fn a_quiet_log_is_written_within_a_second_and_off_writes_nothing() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let tg = start(&format!("access_log: {}\n{}", file.display(), idp.config_to(&up.url()))).await;
    wait_ready(&tg).await;
    let r = client().get(format!("http://{}/one", tg.proxy_addr)).header("x-request-id", "log-test-1").send();
    assert_eq!(r.await.unwrap().status(), 200);
    let mut seen = Vec::new();
    for _ in 0..40 {
        seen = lines(&file);
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.len(), 1, "a single request's line is flushed by time");
    assert!(seen[0].contains(" \"GET /one HTTP/1.1\" 200 "), "{}", seen[0]);
    assert!(seen[0].ends_with(" id=log-test-1"), "the request id closes the line: {}", seen[0]);
    assert_eq!(metric(tg.admin_addr, "tokengate_access_log_lines_total").await, 1);
    assert_eq!(metric(tg.admin_addr, "tokengate_access_log_dropped_total").await, 0);

    let off = start(&format!("access_log: off\n{}", idp.config_to(&up.url()))).await;
    assert_eq!(client().get(format!("http://{}/two", off.proxy_addr)).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(metric(off.admin_addr, "tokengate_access_log_lines_total").await, 0);
    assert_eq!(lines(&file).len(), 1);
}

#[tokio::test]
async fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let (proxy, admin) = (closed_port(), closed_port());
    let path = dir.path().join("tg.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {proxy}\nadmin:\n  listen: {admin}\naccess_log: {{to: {}, format: json}}\n{}",
            file.display(),
            idp.config_to(&up.url())
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["--log", "warn", "run", "-c", path.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = client();
    wait_ready_at(admin).await;
    assert_eq!(c.get(format!("http://{proxy}/before")).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    let _ = std::process::Command::new("kill").args(["-USR1", &child.id().to_string()]).status();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.get(format!("http://{proxy}/after")).send().await.unwrap().status(), 200);
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let old = lines(&rotated);
    let new = lines(&file);
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(new.len(), 1, "{new:?}");
    let before: serde_json::Value = serde_json::from_str(&old[0]).unwrap();
    let after: serde_json::Value = serde_json::from_str(&new[0]).unwrap();
    assert_eq!((before["path"].as_str(), after["path"].as_str()), (Some("/before"), Some("/after")));
}

#[test]
fn a_bad_access_log_setting_names_the_key() {
    for (yaml, want) in [
        ("access_log: {to: stderr, format: xml}\n", "access_log"),
        ("access_log: {to: stderr, colour: true}\n", "access_log"),
        ("access_log: ''\n", "access_log"),
    ] {
        let text = format!("{yaml}providers: {{}}\nroutes: []\n");
        let e = tokengate::config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("t.yaml:1"), "{yaml}: {e}");
    }
}

/// A line says which of tokengate's own errors answered, and for which Host.
#[tokio::test]
async fn a_line_names_the_error_code_and_the_host() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let yaml = format!(
        "access_log:\n  to: {}\n  format: json\n{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n    methods: [GET]\n",
        file.display(),
        idp.provider_yaml(),
        up.url()
    );
    let tg = start(&yaml).await;
    let url = format!("http://{}", tg.proxy_addr);
    assert_eq!(client().get(format!("{url}/api/x")).send().await.unwrap().status(), 200);
    assert_eq!(client().delete(format!("{url}/api/x")).send().await.unwrap().status(), 405);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let parsed: Vec<serde_json::Value> =
        lines(&file).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed.len(), 2, "{parsed:?}");
    assert_eq!(parsed[0]["error"], serde_json::Value::Null);
    assert_eq!(parsed[1]["error"], "method_not_allowed");
    assert!(parsed.iter().all(|l| l["host"] == tg.proxy_addr.to_string()), "{parsed:?}");
    tg.shutdown().await;
}
