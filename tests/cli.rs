//! The `tokengate` binary: `check` on the shipped example configs and on broken files.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;

const PLACEHOLDERS: &[(&str, &str)] = &[
    ("COREVIEW_CLIENT_ID", "placeholder-id"),
    ("COREVIEW_CLIENT_SECRET", "placeholder-secret"),
    ("COREVIEW_GOV_CLIENT_ID", "placeholder-id"),
    ("COREVIEW_GOV_CLIENT_SECRET", "placeholder-secret"),
    ("CORTI_ENVIRONMENT", "eu"),
    ("CORTI_TENANT", "acme"),
    ("CORTI_CLIENT_ID", "placeholder-id"),
    ("CORTI_CLIENT_SECRET", "placeholder-secret"),
    ("SCREENING_EAGLE_CLIENT_ID", "placeholder-id"),
    ("SCREENING_EAGLE_API_URL", "https://api.example.com"),
    ("COVATA_TOKEN_URL", "https://covata.example.com/api/oauth/token"),
    ("COVATA_API_URL", "https://covata.example.com/api"),
    ("COVATA_CLIENT_ID", "placeholder-id"),
    ("COVATA_CLIENT_SECRET", "placeholder-secret"),
    ("COVATA_USERNAME", "placeholder-user"),
    ("COVATA_PASSWORD", "placeholder-password"),
    ("REPORTS_COVATA_USERNAME", "placeholder-user"),
    ("REPORTS_COVATA_PASSWORD", "placeholder-password"),
    ("SENSU_URL", "https://sensu.example.com:8080"),
    ("SENSU_USERNAME", "placeholder-user"),
    ("SENSU_PASSWORD", "placeholder-password"),
    ("EXAMPLE_CLIENT_ID", "placeholder-id"),
    ("EXAMPLE_CLIENT_SECRET", "placeholder-secret"),
    ("AZURE_CLIENT_ID", "placeholder-id"),
    ("AZURE_TENANT_ID", "placeholder-tenant"),
    ("OIDC_ISSUER", "https://idp.example.com/realms/acme"),
    ("OIDC_CLIENT_ID", "placeholder-id"),
    ("API_URL", "https://api.example.com/v1"),
];

fn tokengate(args: &[&str], secret_file: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokengate"));
    cmd.args(args)
        .env_clear()
        .env("SCREENING_EAGLE_CLIENT_SECRET_FILE", secret_file)
        .env("SENSU_API_KEY_FILE", secret_file)
        .env("BILLING_API_KEYS_FILE", secret_file);
    // Files the secretless examples read at load time: a key and a projected token.
    let dir = secret_file.parent().unwrap();
    let key = dir.join("client.pem");
    if !key.exists() {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
        std::fs::write(&key, pem).unwrap();
        std::fs::write(dir.join("azure-identity-token"), "eyJhbGciOiJub25lIn0.eyJleHAiOjB9.\n").unwrap();
    }
    let ca = dir.join("cluster-ca.pem");
    if !ca.exists() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["kubernetes".to_owned()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
    }
    cmd.env("KUBERNETES_CA_FILE", &ca);
    cmd.env("OIDC_PRIVATE_KEY_FILE", &key)
        .env("AZURE_FEDERATED_TOKEN_FILE", dir.join("azure-identity-token"));
    for (k, v) in PLACEHOLDERS {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn every_example_config_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "placeholder-secret\n").unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = tokengate(&["check", "-c", path.to_str().unwrap()], &secret);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}: {}{stdout}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("OK") && stdout.contains("routes"), "{stdout}");
            assert!(
                !stdout.contains("placeholder-secret") && !stdout.contains("placeholder-password"),
                "{stdout}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} example configs");
}

#[test]
fn coreview_example_routes_six_datacenters_through_two_identity_providers() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokengate(
        &["check", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/config/coreview.yaml")],
        &dir.path().join("x"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for host in ["apiproxy", "usapiproxy", "caeapiproxy", "ausapiproxy", "uknapiproxy"] {
        assert!(stdout.contains(&format!("https://{host}.coreview.com ")), "{host}: {stdout}");
    }
    let gov = stdout.lines().find(|l| l.contains("usgovapiproxy")).unwrap();
    assert!(gov.contains("/coreview/gov") && gov.ends_with("provider=coreview-gov"), "{gov}");
    assert!(stdout.contains("issuer https://identity.coreview.com/ (discovery)"));
    assert!(stdout.contains("issuer https://usidentity.coreview.com/ (discovery)"));
}

#[test]
fn check_reports_file_line_and_key_for_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "providers: {}\nroutes:\n  - prefix: /a\n    upstream: https://x\n    provider: nope\n",
            "bad.yaml:5:15: routes[0].provider: no provider named \"nope\"",
        ),
        (
            "providers: {}\nroutes:\n  - prefix: /a\n    upstream: https://x\n    provder: p\n",
            "bad.yaml:5:5: routes[0].provder: unknown field `provder`",
        ),
        (
            "listen: nowhere\nproviders: {}\nroutes: []\n",
            "bad.yaml:1:9: listen: invalid listen address \"nowhere\"",
        ),
        (
            "providers:\n  p:\n    type: oauth2\n    token_url: http://idp.example.com/t\n    client_id: a\n    client_secret: b\nroutes: []\n",
            "uses plain http",
        ),
        (
            "providers:\n  p:\n    type: oauth2\n    token_url: https://idp/t\n    client_id: a\n    client_secret: ${UNSET_SECRET}\nroutes: []\n",
            "environment variables not set: UNSET_SECRET (line 6)",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, text).unwrap();
        let out = tokengate(&["check", "-c", path.to_str().unwrap()], &path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
        assert!(stderr.contains("bad.yaml"), "{stderr}");
        assert!(
            stderr.contains(".yaml:")
                && stderr.split(".yaml:").nth(1).unwrap().starts_with(|c: char| c.is_ascii_digit()),
            "no line in {stderr}"
        );
    }
    let out = tokengate(&["check", "-c", "/nonexistent/tokengate.yaml"], &dir.path().join("x"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tokengate.yaml: cannot read the file")
    );
}

#[test]
fn an_explicit_log_filter_beats_rust_log_and_json_logs_are_flat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tg.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\naccess_log: off\nproviders:\n  p:\n    type: oauth2\n    token_url: http://127.0.0.1:9/token\n    client_id: a\n    client_secret: b\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: p\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "NO_COLOR=1 RUST_LOG=trace {} --log info --log-format json run -c {} 2> {} & pid=$!; sleep 1; kill -TERM $pid; wait $pid",
        env!("CARGO_BIN_EXE_tokengate"),
        path.display(),
        log.display()
    );
    Command::new("sh").args(["-c", &script]).status().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        lines.iter().all(|l| l["level"] != "DEBUG" && l["level"] != "TRACE"),
        "RUST_LOG won over --log: {text}"
    );
    let listening =
        lines.iter().find(|l| l["message"] == "tokengate is listening").unwrap_or_else(|| panic!("{text}"));
    assert!(listening["proxy_addr"].is_string(), "fields are not at the top level: {listening}");
}

/// `${NAME}` references in `text`.
fn variables(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let end = rest.find(['}', ':']).unwrap_or(rest.len());
        out.insert(rest[..end].to_owned());
    }
    out
}

#[test]
fn every_example_header_names_exactly_the_variables_its_body_reads() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let split = text.lines().take_while(|l| l.starts_with('#') || l.trim().is_empty()).count();
        let header: String = text.lines().take(split).collect::<Vec<_>>().join("\n");
        let body: String = text.lines().skip(split).collect::<Vec<_>>().join("\n");
        // Words in the header that look like environment variables (upper case with `_`).
        let named: std::collections::BTreeSet<String> = header
            .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .filter(|w| w.contains('_') && w.starts_with(|c: char| c.is_ascii_uppercase()))
            .map(str::to_owned)
            .collect();
        let read = variables(&body);
        assert_eq!(
            named,
            read,
            "{}: the header documents {named:?}, the body reads {read:?}",
            path.display()
        );
    }
}

#[test]
fn every_missing_variable_is_reported_in_one_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["check", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/config/covata.yaml")])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "COVATA_TOKEN_URL",
        "COVATA_API_URL",
        "COVATA_CLIENT_ID",
        "COVATA_CLIENT_SECRET",
        "COVATA_USERNAME",
        "COVATA_PASSWORD",
    ] {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
    assert!(
        err.contains("covata.yaml:")
            && err.contains(": environment variables not set:")
            && err.contains("(line "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn check_refuses_what_run_refuses_and_prints_what_run_warns() {
    let dir = tempfile::tempdir().unwrap();
    let base = "providers:\n  p:\n    type: oauth2\n    token_url: https://idp.example/t\n    client_id: a\n    client_secret_file: SECRET\nroutes:\n  - prefix: /\n    upstream: https://api.example\n    provider: p\n";
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s\n").unwrap();
    let base = base.replace("SECRET", secret.to_str().unwrap());
    let missing = dir.path().join("missing.pem");
    let cases = [
        format!(
            "tls:\n  listen: 127.0.0.1:8443\n  cert_file: {0}\n  key_file: {0}\n{base}",
            missing.display()
        ),
        base.replace("    provider: p\n", &format!("    provider: p\n    ca_file: {}\n", missing.display())),
    ];
    for text in cases {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, &text).unwrap();
        let out = tokengate(&["check", "-c", path.to_str().unwrap()], &secret);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "check passed a config run refuses:\n{text}\n{stderr}");
        assert!(stderr.contains("missing.pem"), "{stderr}");
    }
    // Served, with the warnings run would log.
    let path = dir.path().join("open.yaml");
    std::fs::write(&path, format!("listen: 0.0.0.0:8080\n{base}")).unwrap();
    let out = tokengate(&["check", "-c", path.to_str().unwrap()], &secret);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("warning:") && stdout.contains("no access control"), "{stdout}");
    assert!(stdout.contains("OK, with warnings"), "{stdout}");
}

#[test]
fn the_demo_prints_its_credentials_and_a_token_command_that_works() {
    use std::io::BufRead;
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut text = String::new();
    for line in std::io::BufReader::new(demo.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if line.contains("Ctrl-C stops") {
            break;
        }
    }
    assert!(text.contains("client id demo-client, client secret demo-secret"), "{text}");
    let command = text
        .lines()
        .find(|l| l.trim_start().starts_with("tokengate token -c"))
        .unwrap_or_else(|| panic!("{text}"));
    let args: Vec<&str> = command.split('#').next().unwrap().split_whitespace().skip(1).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate")).args(&args).output().unwrap();
    let _ = Command::new("kill").args(["-TERM", &demo.id().to_string()]).status();
    let _ = demo.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("expires    in 30 s (from expires_in)"), "{stdout}");
    assert!(!std::path::Path::new(args[2]).exists(), "the demo left its configuration file behind");
}

/// `token` and `check --live` say loudly when the IdP dropped a requested scope, and that a
/// scope cannot be confirmed when neither the reply nor the token states one.
#[tokio::test]
async fn a_dropped_scope_is_reported_not_hidden() {
    let idp = tokengate::demo::serve_fn(SocketAddr::from(([127, 0, 0, 1], 0)), |req| async move {
        let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&body).into_owned().collect();
        // Grants only `read`; says nothing about scope when asked for `silent`.
        let reply = if form.get("scope").is_some_and(|s| s.contains("silent")) {
            serde_json::json!({"access_token": "opaque-token", "token_type": "Bearer", "expires_in": 300})
        } else {
            serde_json::json!({"access_token": "opaque-token", "token_type": "Bearer", "expires_in": 300, "scope": "read"})
        };
        let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(reply.to_string())));
        resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
        resp
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    let provider = |name: &str, scopes: &str| {
        format!(
            "  {name}:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: c\n    client_secret: s\n    scopes: [{scopes}]\n"
        )
    };
    std::fs::write(
        &path,
        format!(
            "providers:\n{}{}routes:\n  - prefix: /\n    upstream: https://api.example\n    provider: dropped\n",
            provider("dropped", "read, write"),
            provider("silent", "silent")
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tokengate")).args(args).env_clear().output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let file = path.to_str().unwrap();
    let out = tokio::task::spawn_blocking({
        let file = file.to_owned();
        move || run(&["token", &file, "dropped"])
    })
    .await
    .unwrap();
    assert!(out.contains("WARNING: requested scope(s) write NOT granted"), "{out}");
    let out = tokio::task::spawn_blocking({
        let file = file.to_owned();
        move || run(&["check", &file, "--live"])
    })
    .await
    .unwrap();
    assert!(out.contains("WARNING: requested scope(s) write NOT granted"), "{out}");
    assert!(out.contains("cannot be confirmed") && out.contains("requested: silent"), "{out}");
}
