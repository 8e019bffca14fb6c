//! Client authentication without static secrets, against a real authorization server:
//! node-oidc-provider (tests/oidc/server.mjs) authenticates tokengate with private_key_jwt (RS256,
//! PS256, ES256, EdDSA), client_secret_jwt, tls_client_auth and self_signed_tls_client_auth,
//! verifying every assertion with the `jose` library, and an upstream accepts a request only when
//! the server's introspection endpoint calls its token active. Key, certificate and assertion
//! files are rotated while requests flow.
//!
//! Needs node and npm; tests/oidc's packages are installed on first use (`npm ci`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// The running authorization server and its introspecting upstream, killed on drop.
struct Oidc {
    child: std::process::Child,
    issuer: String,
    api: String,
    stderr: PathBuf,
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static NPM: Mutex<Option<bool>> = Mutex::new(None);

/// Installs tests/oidc's packages once; false (after saying so) when node or npm is missing.
fn node_ready() -> bool {
    let mut done = NPM.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ok) = *done {
        return ok;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    let ok = if std::process::Command::new("node").arg("--version").output().is_err() {
        skipped("node", "apt-get install nodejs npm");
        false
    } else if dir.join("node_modules/oidc-provider").exists() {
        true
    } else {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status();
        let ok = status.is_ok_and(|s| s.success());
        if !ok {
            skipped("oidc-provider (npm ci in tests/oidc)", "cd tests/oidc && npm ci");
        }
        ok
    };
    *done = Some(ok);
    ok
}

impl Oidc {
    /// Starts the server with `clients` (oidc-provider metadata; `jwks_pem` lists PEM files
    /// whose public keys are registered, `x5c_pem` a self-signed certificate). A client
    /// `resource-server` for introspection is added.
    async fn start(pki: &Pki, clients: serde_json::Value, extra: serde_json::Value) -> Option<Oidc> {
        if !node_ready() {
            return None;
        }
        let mut clients = clients.as_array().unwrap().clone();
        clients.push(serde_json::json!({
            "client_id": "resource-server",
            "client_secret": "resource-server-secret-0123456789abcdef",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": [],
        }));
        let mut cfg = serde_json::json!({
            "cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca, "clients": clients,
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let cfg_path = pki.dir.path().join(format!("oidc-{}.json", rand::random::<u32>()));
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let stderr = cfg_path.with_extension("log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc/server.mjs");
        let mut child = std::process::Command::new("node")
            .arg(&script)
            .arg(&cfg_path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(20), line).await;
        let line = match line {
            Ok(Ok(Ok(l))) if l.starts_with("READY ") => l,
            other => {
                let _ = child.kill();
                panic!(
                    "oidc-provider did not start ({other:?}):\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&line["READY ".len()..]).unwrap();
        Some(Oidc {
            child,
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            api: ready["api"].as_str().unwrap().to_owned(),
            stderr,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// A provider block using discovery against this server.
    fn provider(&self, name: &str, pki: &Pki, body: &str) -> String {
        format!(
            "  {name}:\n    type: oauth2\n    issuer: {}\n    ca_file: {}\n    scopes: [api:read]\n{body}",
            self.issuer,
            pki.ca.display()
        )
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Replaces `path` the way the kubelet and most deploy tools do: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A self-signed certificate for `dns` and its key, written to `{name}.pem` and `{name}.key`.
fn self_signed(dir: &Path, name: &str, dns: &str) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![dns.to_owned()]).unwrap().self_signed(&key).unwrap();
    (
        write(dir, &format!("{name}.pem"), &cert.pem()),
        write(dir, &format!("{name}.key"), &key.serialize_pem()),
    )
}

/// The client keys of a mutual-TLS provider.
fn mtls(id: &str, method: &str, cert: &Path, key: &Path) -> String {
    format!(
        "    client_id: {id}\n    client_auth: {method}\n    client_cert_file: {}\n    client_key_file: {}\n",
        cert.display(),
        key.display()
    )
}

fn ec_key() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem()
}

/// An Ed25519 key as OpenSSL writes it (PKCS#8 v1; node reads ring's v2 encoding as no key).
fn ed_key() -> Option<String> {
    openssl(&["genpkey", "-algorithm", "ed25519"])
}

/// A 2048-bit RSA key from openssl (rcgen generates RSA only with aws-lc-rs).
fn rsa_key() -> Option<String> {
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
}

fn openssl(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("openssl").args(args).output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8(o.stdout).unwrap()),
        _ => {
            skipped("openssl", "apt-get install openssl");
            None
        }
    }
}

/// The upstream's verdict on the token tokengate attached to a request through `prefix`.
async fn through(tg: &tokengate::server::Running, prefix: &str) -> (u16, serde_json::Value) {
    let r = client().get(format!("http://{}{prefix}/data?x=1", tg.proxy_addr)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn tokens(tg: &tokengate::server::Running) -> serde_json::Value {
    client().get(format!("http://{}/tokens", tg.admin_addr)).send().await.unwrap().json().await.unwrap()
}

fn unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn routes(oidc: &Oidc, names: &[&str]) -> String {
    let mut out = String::from("routes:\n");
    for n in names {
        out.push_str(&format!("  - prefix: /{n}\n    upstream: {}\n    provider: {n}\n", oidc.api));
    }
    out
}

#[tokio::test]
async fn private_key_jwt_with_every_algorithm() {
    let pki = pki();
    let (Some(rsa), Some(ed)) = (rsa_key(), ed_key()) else { return };
    let dir = pki.dir.path();
    let rsa = write(dir, "rsa.pem", &rsa);
    let ec = write(dir, "ec.pem", &ec_key());
    let ed = write(dir, "ed.pem", &ed);
    let client = |id: &str, alg: &str, key: &Path| {
        serde_json::json!({
            "client_id": id, "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": alg, "jwks_pem": [key], "scope": "api:read",
        })
    };
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            client("rs256", "RS256", &rsa),
            client("ps256", "PS256", &rsa),
            client("es256", "ES256", &ec),
            client("eddsa", "EdDSA", &ed),
        ]),
        serde_json::json!({}),
    )
    .await
    else {
        return;
    };
    let body = |id: &str, key: &Path, alg: &str| {
        format!(
            "    client_id: {id}\n    client_auth: private_key_jwt\n    private_key_file: {}\n{alg}",
            key.display()
        )
    };
    let mut yaml = String::from("providers:\n");
    // RS256, ES256 and EdDSA come from the key itself; PS256 is asked for.
    yaml.push_str(&oidc.provider("rs256", &pki, &body("rs256", &rsa, "")));
    yaml.push_str(&oidc.provider("ps256", &pki, &body("ps256", &rsa, "    signing_alg: PS256\n")));
    yaml.push_str(&oidc.provider("es256", &pki, &body("es256", &ec, "")));
    yaml.push_str(&oidc.provider("eddsa", &pki, &body("eddsa", &ed, "")));
    yaml.push_str(&routes(&oidc, &["rs256", "ps256", "es256", "eddsa"]));
    let tg = start(&yaml).await;
    for id in ["rs256", "ps256", "es256", "eddsa"] {
        let (status, seen) = through(&tg, &format!("/{id}")).await;
        assert_eq!(status, 200, "{id}: {seen}\nIdP log:\n{}", oidc.log());
        assert_eq!(seen["active"], true, "{id}");
        assert_eq!(seen["client_id"], id);
        assert_eq!(seen["scope"], "api:read");
        assert_eq!(seen["path"], "/data?x=1");
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn client_secret_jwt_and_both_mutual_tls_methods() {
    let pki = pki();
    let dir = pki.dir.path();
    let secret = "a-client-secret-of-forty-eight-characters-000000";
    // A certificate from the CA the server trusts, and a self-signed one it pins.
    let cert = write(dir, "client.pem", &pki.client_cert_pem);
    let key = write(dir, "client.key", &pki.client_key_pem);
    let (own_cert, own_key) = self_signed(dir, "own", "self.internal");
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            { "client_id": "hs", "client_secret": secret, "token_endpoint_auth_method": "client_secret_jwt",
              "token_endpoint_auth_signing_alg": "HS256", "scope": "api:read" },
            { "client_id": "mtls", "token_endpoint_auth_method": "tls_client_auth",
              "tls_client_auth_san_dns": "app.internal", "scope": "api:read" },
            { "client_id": "pinned", "token_endpoint_auth_method": "self_signed_tls_client_auth",
              "x5c_pem": own_cert, "scope": "api:read" },
        ]),
        serde_json::json!({}),
    )
    .await
    else {
        return;
    };
    let mut yaml = String::from("providers:\n");
    yaml.push_str(&oidc.provider(
        "hs",
        &pki,
        &format!("    client_id: hs\n    client_auth: client_secret_jwt\n    client_secret: {secret}\n"),
    ));
    yaml.push_str(&oidc.provider("mtls", &pki, &mtls("mtls", "tls_client_auth", &cert, &key)));
    yaml.push_str(&oidc.provider(
        "pinned",
        &pki,
        &mtls("pinned", "self_signed_tls_client_auth", &own_cert, &own_key),
    ));
    yaml.push_str(&routes(&oidc, &["hs", "mtls", "pinned"]));
    let tg = start(&yaml).await;
    for id in ["hs", "mtls", "pinned"] {
        let (status, seen) = through(&tg, &format!("/{id}")).await;
        assert_eq!(status, 200, "{id}: {seen}\nIdP log:\n{}", oidc.log());
        assert_eq!(seen["active"], true, "{id}");
        assert_eq!(seen["client_id"], id);
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn an_unregistered_key_or_certificate_is_refused_and_reported_without_secrets() {
    let pki = pki();
    let dir = pki.dir.path();
    let registered = write(dir, "registered.pem", &ec_key());
    let other = write(dir, "other.pem", &ec_key());
    // A certificate the server's CA did not sign, for a CA-verified client.
    let (stray_cert, stray_key) = self_signed(dir, "stray", "app.internal");
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            { "client_id": "es", "token_endpoint_auth_method": "private_key_jwt", "jwks_pem": [registered] },
            { "client_id": "mtls", "token_endpoint_auth_method": "tls_client_auth", "tls_client_auth_san_dns": "app.internal" },
        ]),
        serde_json::json!({}),
    )
    .await
    else {
        return;
    };
    let mut yaml = String::from("providers:\n");
    yaml.push_str(&oidc.provider(
        "es",
        &pki,
        &format!(
            "    client_id: es\n    client_auth: private_key_jwt\n    private_key_file: {}\n",
            other.display()
        ),
    ));
    yaml.push_str(&oidc.provider("mtls", &pki, &mtls("mtls", "tls_client_auth", &stray_cert, &stray_key)));
    yaml.push_str(&routes(&oidc, &["es", "mtls"]));
    let tg = start(&yaml).await;
    for id in ["es", "mtls"] {
        let (status, body) = through(&tg, &format!("/{id}")).await;
        assert_eq!(status, 503, "{id}: {body}");
        assert_eq!(body["error"], "token_unavailable", "{id}: {body}");
        let t = tokens(&tg).await;
        let error = t["providers"][id]["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains("HTTP 401") && error.contains("invalid_client"), "{id}: {t}");
        // No assertion (a JWT) and no key material in what the client or the admin sees.
        let text = format!("{body}{t}");
        assert!(!text.contains("eyJ") && !text.contains("PRIVATE"), "{id}: {text}");
    }
    tg.shutdown().await;
}

/// Requests in a loop until `stop`; returns the statuses.
fn traffic(
    addr: std::net::SocketAddr,
    prefix: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let c = client();
        let mut statuses = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = c.get(format!("http://{addr}{prefix}/data")).send().await.unwrap();
            statuses.push(r.status().as_u16());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses
    })
}

async fn tokens_at(admin: std::net::SocketAddr) -> serde_json::Value {
    client().get(format!("http://{admin}/tokens")).send().await.unwrap().json().await.unwrap()
}

async fn fetches(admin: std::net::SocketAddr, name: &str) -> u64 {
    let t = tokens_at(admin).await;
    t["providers"][name]["fetches_ok"].as_u64().unwrap_or_else(|| panic!("no fetch count in {t}"))
}

async fn wait_fetches(admin: std::net::SocketAddr, name: &str, at_least: u64) {
    for _ in 0..400 {
        if fetches(admin, name).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name}: fewer than {at_least} fetches; /tokens: {}", tokens_at(admin).await);
}

#[tokio::test]
async fn keys_and_certificates_rotate_while_requests_flow() {
    let pki = pki();
    let dir = pki.dir.path();
    let old_pem = ec_key();
    let new_pem = ec_key();
    let old = write(dir, "old.pem", &old_pem);
    let new = write(dir, "new.pem", &new_pem);
    let key = write(dir, "signing.pem", &old_pem);
    let cert = write(dir, "client.pem", &pki.client_cert_pem);
    let cert_key = write(dir, "client.key", &pki.client_key_pem);
    // The IdP knows both keys during the rotation, as a JWKS does, each by its own thumbprint.
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            { "client_id": "rot", "token_endpoint_auth_method": "private_key_jwt", "jwks_pem": [old, new], "scope": "api:read" },
            { "client_id": "mtls", "token_endpoint_auth_method": "tls_client_auth", "tls_client_auth_san_dns": "app.internal", "scope": "api:read" },
        ]),
        // Short-lived tokens, so fetches follow each other while the test runs.
        serde_json::json!({ "ttl": 3 }),
    )
    .await
    else {
        return;
    };
    let (proxy, admin) = (closed_port(), closed_port());
    let mut yaml = format!("listen: {proxy}\nadmin:\n  listen: {admin}\naccess_log: off\nproviders:\n");
    yaml.push_str(&oidc.provider(
        "rot",
        &pki,
        &format!("    client_id: rot\n    client_auth: private_key_jwt\n    private_key_file: {}\n    refresh_margin: 2s\n", key.display()),
    ));
    yaml.push_str(&oidc.provider(
        "mtls",
        &pki,
        &format!("{}    refresh_margin: 2s\n", mtls("mtls", "tls_client_auth", &cert, &cert_key)),
    ));
    yaml.push_str(&routes(&oidc, &["rot", "mtls"]));
    let path = write(dir, "tokengate.yaml", &yaml);
    let p = Process::spawn(&path, admin);
    p.ready().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = traffic(proxy, "/rot", stop.clone());
    let b = traffic(proxy, "/mtls", stop.clone());
    let (rot0, mtls0) = (fetches(admin, "rot").await, fetches(admin, "mtls").await);
    replace(&key, &new_pem);
    replace(&cert_key, &pki.client2_key_pem);
    replace(&cert, &pki.client2_cert_pem);
    // Two fetches each after the swap: the first may have started before it.
    wait_fetches(admin, "rot", rot0 + 2).await;
    wait_fetches(admin, "mtls", mtls0 + 2).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (name, h) in [("rot", a), ("mtls", b)] {
        let statuses = h.await.unwrap();
        assert!(statuses.len() > 10, "{name}: {statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{name}: a request failed during the rotation: {statuses:?}\n{}",
            p.log_text()
        );
    }
    p.logged("signing with the new key in private_key_file").await;
    let text = p.logged("presenting the new client certificate").await;
    assert!(!text.contains("eyJ") && !text.contains("PRIVATE KEY"), "{text}");
}

#[tokio::test]
async fn a_client_assertion_file_is_read_for_every_fetch_and_never_sent_expired() {
    let pki = pki();
    let dir = pki.dir.path();
    // The "platform" issuing projected tokens: its key is registered for the client.
    let platform_pem = ec_key();
    let platform = write(dir, "platform.pem", &platform_pem);
    let signer = std::sync::Arc::new(
        tokengate::jose::SigningKey::from_pem(platform_pem.as_bytes(), None, None, None).unwrap(),
    );
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            { "client_id": "workload", "token_endpoint_auth_method": "private_key_jwt", "jwks_pem": [platform], "scope": "api:read" },
        ]),
        serde_json::json!({ "ttl": 3 }),
    )
    .await
    else {
        return;
    };
    let issuer = oidc.issuer.clone();
    let assertion = move |exp: u64, jti: &str| {
        signer
            .sign(&serde_json::json!({
                "iss": "workload", "sub": "workload", "aud": issuer, "jti": jti, "iat": unix(), "exp": exp,
            }))
            .unwrap()
    };
    let file = write(dir, "token", &assertion(unix() + 600, "0"));
    // A platform that renews the file often. oidc-provider accepts each assertion once, so a
    // fetch that reused what an earlier fetch had read would be refused as a replay.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (file, stop, assertion) = (file.clone(), stop.clone(), assertion.clone());
        tokio::spawn(async move {
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                replace(&file, &assertion(unix() + 600, &n.to_string()));
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let yaml = format!(
        "providers:\n{}{}",
        oidc.provider(
            "workload",
            &pki,
            &format!("    client_id: workload\n    client_auth: client_assertion_file\n    client_assertion_file: {}\n    refresh_margin: 2s\n", file.display()),
        ),
        routes(&oidc, &["workload"])
    );
    let tg = start(&yaml).await;
    let (status, seen) = through(&tg, "/workload").await;
    assert_eq!(status, 200, "{seen}\n{}", oidc.log());
    assert_eq!(seen["client_id"], "workload");
    wait_fetches(tg.admin_addr, "workload", 3).await;
    let t = tokens(&tg).await;
    assert_eq!(t["providers"]["workload"]["fetches_failed"], 0, "{t}\n{}", oidc.log());
    // Expired: reported, and not sent.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    replace(&file, &assertion(unix() - 120, "expired"));
    let mut last_error = String::new();
    for _ in 0..200 {
        let t = tokens(&tg).await;
        if let Some(e) = t["providers"]["workload"]["last_error"].as_str() {
            last_error = e.to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(last_error.contains("expired 12") && last_error.contains("not renewed"), "{last_error:?}");
    let m =
        client().get(format!("http://{}/metrics", tg.admin_addr)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("result=\"credential_error\""), "{m}");
    assert!(!m.contains("invalid_client"), "the expired assertion reached the IdP: {m}");
    tg.shutdown().await;
}

#[tokio::test]
async fn jwt_bearer_and_token_exchange_grants() {
    let pki = pki();
    let dir = pki.dir.path();
    let Some(ed) = ed_key() else { return };
    let bearer_key = write(dir, "bearer.pem", &ed);
    let subject_pem = ec_key();
    let subject_key = write(dir, "subject.pem", &subject_pem);
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            { "client_id": "svc", "token_endpoint_auth_method": "none",
              "grant_types": ["urn:ietf:params:oauth:grant-type:jwt-bearer"], "scope": "api:read" },
            { "client_id": "exchanger", "client_secret": "exchanger-secret-0123456789abcdef",
              "token_endpoint_auth_method": "client_secret_basic",
              "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"], "scope": "api:read" },
        ]),
        serde_json::json!({ "jwt_bearer_keys": [bearer_key], "subject_keys": [subject_key] }),
    )
    .await
    else {
        return;
    };
    let subject = tokengate::jose::SigningKey::from_pem(subject_pem.as_bytes(), None, None, None)
        .unwrap()
        .sign(&serde_json::json!({ "iss": "https://cluster.local", "sub": "system:serviceaccount:ns:app", "exp": unix() + 600 }))
        .unwrap();
    let subject_file = write(dir, "subject-token", &format!("{subject}\n"));
    let mut yaml = String::from("providers:\n");
    yaml.push_str(&oidc.provider(
        "svc",
        &pki,
        &format!(
            "    client_id: svc\n    grant: jwt_bearer\n    private_key_file: {}\n    assertion_subject: alice@example.com\n",
            bearer_key.display()
        ),
    ));
    yaml.push_str(&oidc.provider(
        "exchanger",
        &pki,
        &format!(
            "    client_id: exchanger\n    client_secret: exchanger-secret-0123456789abcdef\n    grant: token_exchange\n    token_exchange:\n      subject_token_file: {}\n      subject_token_type: jwt\n      audience: https://api.example\n",
            subject_file.display()
        ),
    ));
    yaml.push_str(&routes(&oidc, &["svc", "exchanger"]));
    let tg = start(&yaml).await;
    let (status, seen) = through(&tg, "/svc").await;
    assert_eq!(status, 200, "{seen}\n{}", oidc.log());
    assert_eq!(seen["client_id"], "svc");
    assert_eq!(seen["sub"], "alice@example.com");
    let (status, seen) = through(&tg, "/exchanger").await;
    assert_eq!(status, 200, "{seen}\n{}", oidc.log());
    assert_eq!(seen["client_id"], "exchanger");
    assert_eq!(seen["sub"], "system:serviceaccount:ns:app");
    tg.shutdown().await;
}

/// A mock server recording every request, answering with `answer(path)`.
async fn recorder(
    answer: impl Fn(&str) -> http::Response<http_body_util::Full<bytes::Bytes>> + Clone + Send + Sync + 'static,
) -> (std::net::SocketAddr, std::sync::Arc<Mutex<Vec<Seen>>>) {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = tokengate::demo::serve_fn(any(), move |req| {
        let (seen, answer) = (s.clone(), answer.clone());
        async move {
            let req = capture(req).await;
            let resp = answer(&req.path);
            seen.lock().unwrap().push(req);
            resp
        }
    })
    .await
    .unwrap();
    (addr, seen)
}

#[tokio::test]
async fn no_method_or_grant_follows_a_redirect_from_the_token_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (trap, trapped) =
        recorder(|_| json(200, serde_json::json!({"access_token": "x", "token_type": "Bearer"}))).await;
    let location = format!("http://{trap}/token");
    let (idp, asked) = recorder(move |_| {
        let mut r = json(307, serde_json::json!({}));
        r.headers_mut().insert("location", location.parse().unwrap());
        r
    })
    .await;
    let key = write(d, "key.pem", &ec_key());
    let pki = pki();
    let cert = write(d, "c.pem", &pki.client_cert_pem);
    let cert_key = write(d, "c.key", &pki.client_key_pem);
    let jwt = tokengate::jose::sign_hs256(b"k", &serde_json::json!({ "exp": unix() + 600 }));
    let assertion = write(d, "assertion", &jwt);
    let methods = [
        ("basic", "client_secret: s\n".to_owned()),
        ("post", "client_secret: s\nclient_auth: post\n".to_owned()),
        ("hs", "client_secret: s\nclient_auth: client_secret_jwt\n".to_owned()),
        ("pk", format!("client_auth: private_key_jwt\nprivate_key_file: {}\n", key.display())),
        (
            "mtls",
            mtls("mtls", "tls_client_auth", &cert, &cert_key)
                .replace("    ", "")
                .replace("client_id: mtls\n", ""),
        ),
        (
            "file",
            format!("client_auth: client_assertion_file\nclient_assertion_file: {}\n", assertion.display()),
        ),
        ("bearer", format!("grant: jwt_bearer\nprivate_key_file: {}\n", key.display())),
        (
            "exchange",
            format!(
                "client_secret: s\ngrant: token_exchange\ntoken_exchange:\n  subject_token_file: {}\n",
                assertion.display()
            ),
        ),
    ];
    let mut yaml = String::from("providers:\n");
    let mut route_list = String::from("routes:\n");
    for (name, body) in &methods {
        yaml.push_str(&format!(
            "  {name}:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: app\n"
        ));
        for line in body.lines() {
            yaml.push_str(&format!("    {line}\n"));
        }
        route_list
            .push_str(&format!("  - prefix: /{name}\n    upstream: http://{trap}\n    provider: {name}\n"));
    }
    let tg = start(&format!("{yaml}{route_list}")).await;
    for (name, _) in &methods {
        let (status, _) = through(&tg, &format!("/{name}")).await;
        assert_eq!(status, 503, "{name}");
        let t = tokens(&tg).await;
        let error = t["providers"][name]["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("HTTP 307"), "{name}: {t}");
    }
    assert!(asked.lock().unwrap().len() >= methods.len());
    let followed: Vec<String> = trapped.lock().unwrap().iter().map(|s| s.path.clone()).collect();
    assert!(followed.is_empty(), "a token request followed the redirect: {followed:?}");
    tg.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_clients_use_the_advertised_mtls_endpoint_alias() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let cert = write(dir.path(), "c.pem", &pki.client_cert_pem);
    let key = write(dir.path(), "c.key", &pki.client_key_pem);
    let issuer = std::sync::Arc::new(Mutex::new(String::new()));
    let i = issuer.clone();
    let (idp, seen) = recorder(move |path| {
        let base = i.lock().unwrap().clone();
        match path {
            "/.well-known/openid-configuration" => json(
                200,
                serde_json::json!({
                    "issuer": base, "token_endpoint": format!("{base}/token"),
                    "mtls_endpoint_aliases": { "token_endpoint": format!("{base}/mtls/token") },
                }),
            ),
            _ => json(200, serde_json::json!({"access_token": format!("at{path}"), "token_type": "Bearer", "expires_in": 600})),
        }
    })
    .await;
    *issuer.lock().unwrap() = format!("http://{idp}");
    let (up, _) = recorder(|_| json(200, serde_json::json!({}))).await;
    let yaml = format!(
        "providers:\n  mtls:\n    type: oauth2\n    issuer: http://{idp}\n{}  plain:\n    type: oauth2\n    issuer: http://{idp}\n    client_id: app\n    client_secret: s\nroutes:\n  - prefix: /mtls\n    upstream: http://{up}\n    provider: mtls\n  - prefix: /plain\n    upstream: http://{up}\n    provider: plain\n",
        mtls("app", "tls_client_auth", &cert, &key)
    );
    let tg = start(&yaml).await;
    assert_eq!(through(&tg, "/mtls").await.0, 200);
    assert_eq!(through(&tg, "/plain").await.0, 200);
    let posts: Vec<(String, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| (s.path.clone(), s.form().get("client_id").cloned().unwrap_or_default()))
        .collect();
    assert!(posts.contains(&("/mtls/token".to_owned(), "app".to_owned())), "{posts:?}");
    // The secret-based client stays on the plain endpoint, its client_id in the Basic header.
    assert!(posts.contains(&("/token".to_owned(), String::new())), "{posts:?}");
    assert_eq!(posts.len(), 2, "{posts:?}");
    tg.shutdown().await;
}

#[tokio::test]
async fn check_live_fetches_one_token_per_provider_and_reports_it() {
    let idp = Idp::start(IdpOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "c.yaml",
        &format!(
            "{}    scopes: [read]\n  broken:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: wrong\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:1\n    provider: idp\n",
            idp.provider_yaml(),
            idp.token_url()
        ),
    );
    let run = |args: &[&str]| {
        let path = path.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
                .arg("check")
                .arg("-c")
                .arg(&path)
                .args(&args)
                .env("NO_COLOR", "1")
                .output()
                .unwrap()
        })
    };
    let out = run(&["--live", "idp"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("idp: OK (oauth2 grant client_credentials, client_auth client_secret_basic)"),
        "{stdout}"
    );
    assert!(stdout.contains("lifetime 3600 s (from expires_in)"), "{stdout}");
    let clock = stdout.lines().find(|l| l.contains("clock")).unwrap();
    assert!(["+0 s", "-0 s", "+1 s", "-1 s"].iter().any(|c| clock.contains(c)), "{clock}");
    let live = stdout.split("live check").nth(1).unwrap_or_default();
    assert!(!live.contains("broken"), "only the named provider is fetched: {stdout}");
    assert_eq!(idp.calls(), 1);
    let out = run(&["--live"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("broken: FAILED") && stdout.contains("invalid_client"), "{stdout}");
    assert!(!stdout.contains("wrong") && !stdout.contains("secret-1"), "{stdout}");
    let out = run(&["--live", "nope"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `subject_token: caller`: the caller's own validated JWT is exchanged (RFC 8693) at a real
/// authorization server, one token per caller subject, cached, so the upstream sees each caller's
/// workload as the subject.
#[tokio::test]
async fn the_callers_token_is_exchanged_for_each_subject() {
    let pki = pki();
    let dir = pki.dir.path();
    let subject_pem = ec_key();
    let subject_key = write(dir, "subject.pem", &subject_pem);
    let Some(oidc) = Oidc::start(
        &pki,
        serde_json::json!([
            { "client_id": "exchanger", "client_secret": "exchanger-secret-0123456789abcdef",
              "token_endpoint_auth_method": "client_secret_basic",
              "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"], "scope": "api:read" },
            { "client_id": "gateway", "client_secret": "gateway-secret-0123456789abcdef",
              "token_endpoint_auth_method": "client_secret_basic", "scope": "api:read" },
        ]),
        serde_json::json!({ "subject_keys": [subject_key] }),
    )
    .await
    else {
        return;
    };
    // The workloads' issuer (a cluster): its key, published as a JWKS file.
    let signer = tokengate::jose::SigningKey::from_pem(subject_pem.as_bytes(), None, None, None).unwrap();
    let raw = rcgen::KeyPair::from_pem(&subject_pem).unwrap().public_key_raw().to_vec();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    let jwks = serde_json::json!({ "keys": [{ "kty": "EC", "crv": "P-256", "kid": signer.kid(), "x": b64(&raw[1..33]), "y": b64(&raw[33..65]) }] });
    let jwks_file = write(dir, "jwks.json", &jwks.to_string());
    let token_for = |sub: &str| {
        signer
            .sign(&serde_json::json!({ "iss": "https://cluster.local", "sub": sub, "aud": ["tokengate"], "exp": unix() + 600 }))
            .unwrap()
    };
    let mut yaml = format!(
        "callers:\n  batch:\n    jwt:\n      issuer: https://cluster.local\n      jwks_file: {}\n      audiences: [tokengate]\n      subjects: [\"system:serviceaccount:batch:*\"]\nproviders:\n",
        jwks_file.display()
    );
    yaml.push_str(&oidc.provider(
        "exchanger",
        &pki,
        "    client_id: exchanger\n    client_secret: exchanger-secret-0123456789abcdef\n    grant: token_exchange\n    token_exchange:\n      subject_token: caller\n      subject_token_type: jwt\n      actor_token_provider: gateway\n      audience: https://api.example\n",
    ));
    // tokengate's own identity, sent as the actor.
    yaml.push_str(&oidc.provider(
        "gateway",
        &pki,
        "    client_id: gateway\n    client_secret: gateway-secret-0123456789abcdef\n",
    ));
    yaml.push_str(&routes(&oidc, &["exchanger"]));
    let tg = start(&yaml).await;
    let call = async |token: &str| {
        let r = client()
            .get(format!("http://{}/exchanger/data", tg.proxy_addr))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let (a, b) = (token_for("system:serviceaccount:batch:a"), token_for("system:serviceaccount:batch:b"));
    for (token, sub) in [(&a, "a"), (&b, "b"), (&a, "a"), (&b, "b")] {
        let (status, seen) = call(token).await;
        assert_eq!(status, 200, "{seen}\n{}", oidc.log());
        assert_eq!(seen["sub"], format!("system:serviceaccount:batch:{sub}"), "{seen}");
        assert_eq!(seen["act"]["sub"], "gateway", "the actor is tokengate's own identity: {seen}");
        assert_eq!(seen["client_id"], "exchanger");
    }
    // One exchange per subject: the second round came from the cache.
    let series = "tokengate_token_fetches_total{provider=\"exchanger\",result=\"success\"}";
    assert_eq!(metric_value(tg.admin_addr, series).await, Some(2.0));
    let t = tokens(&tg).await;
    assert_eq!(t["providers"]["exchanger"]["state"], "per_caller", "{t}");
    assert_eq!(t["providers"]["exchanger"]["subjects"], 2, "{t}");
    // Without a caller's token there is nothing to exchange.
    let (status, body) = through(&tg, "/exchanger").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("caller_unknown")), "{body}");
    tg.shutdown().await;
}

/// `subject_token_provider` and `actor_token_provider`: an exchange sends other providers'
/// current tokens (chained providers); a cycle is refused when the file loads.
#[tokio::test]
async fn an_exchange_can_send_other_providers_tokens() {
    let (workload, platform) =
        (Idp::start(IdpOptions::default()).await, Idp::start(IdpOptions::default()).await);
    let (sts, asked) = recorder(|_| {
        json(
            200,
            serde_json::json!({"access_token": "exchanged-token", "token_type": "Bearer", "expires_in": 300}),
        )
    })
    .await;
    let up = Upstream::start(None).await;
    let yaml = format!(
        "providers:\n{}{}  chained:\n    type: oauth2\n    token_url: http://{sts}/token\n    client_id: sts\n    client_secret: s\n    grant: token_exchange\n    token_exchange:\n      subject_token_provider: workload\n      actor_token_provider: platform\n      audience: https://api.example\nroutes:\n  - prefix: /\n    upstream: {}\n    provider: chained\n",
        workload.provider_entry("workload"),
        platform.provider_entry("platform"),
        up.url()
    );
    let tg = start(&yaml).await;
    let r = client().get(format!("http://{}/x", tg.proxy_addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests()[0].header("authorization").as_deref(), Some("Bearer exchanged-token"));
    let form = asked.lock().unwrap()[0].form();
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:token-exchange");
    assert!(workload.valid(&format!("Bearer {}", form["subject_token"])), "{form:?}");
    assert_eq!(form["subject_token_type"], "urn:ietf:params:oauth:token-type:jwt");
    assert!(platform.valid(&format!("Bearer {}", form["actor_token"])), "{form:?}");
    assert_eq!(form["actor_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    tg.shutdown().await;

    let cycle = "providers:\n  a:\n    type: oauth2\n    token_url: https://idp.example/t\n    client_id: a\n    client_secret: s\n    grant: token_exchange\n    token_exchange: { subject_token_provider: b }\n  b:\n    type: oauth2\n    token_url: https://idp.example/t\n    client_id: b\n    client_secret: s\n    grant: token_exchange\n    token_exchange: { subject_token_provider: a }\nroutes:\n  - prefix: /\n    upstream: https://api.example\n    provider: a\n";
    let e = tokengate::config::parse(cycle, "t.yaml").map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("providers.a.token_exchange.subject_token_provider") && e.contains("cycle"), "{e}");
}
