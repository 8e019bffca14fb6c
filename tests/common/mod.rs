//! Test harness: in-process mock identity providers and upstreams built on hyper, and a real
//! tokengate server on ephemeral loopback ports.
#![allow(dead_code, clippy::unwrap_used)]

pub mod redis;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

pub const ANY: &str = "127.0.0.1:0";

pub fn any() -> SocketAddr {
    ANY.parse().unwrap()
}

/// A request as a mock server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
    pub fn form(&self) -> HashMap<String, String> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }
}

/// Reads a whole request as a mock server saw it.
pub async fn capture(req: Request<Incoming>) -> Seen {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let headers = req.headers().clone();
    let version = req.version();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Seen { method, path, query, headers, body, version }
}

pub fn json(status: u16, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

/// How the mock IdP expects the client to authenticate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Auth {
    Basic,
    Post,
}

#[derive(Clone)]
pub struct IdpOptions {
    pub client_id: String,
    pub client_secret: String,
    pub auth: Auth,
    pub lifetime: Duration,
    pub delay: Duration,
    pub required_scope: Option<String>,
    /// The `token_type` of every reply.
    pub token_type: &'static str,
}

impl Default for IdpOptions {
    fn default() -> Self {
        IdpOptions {
            client_id: "client-1".into(),
            client_secret: "secret-1".into(),
            auth: Auth::Basic,
            lifetime: Duration::from_secs(3600),
            delay: Duration::ZERO,
            required_scope: None,
            token_type: "Bearer",
        }
    }
}

/// A client_credentials token endpoint at `/token` that enforces client authentication exactly
/// as RFC 6749 §2.3.1 describes, and remembers what it issued.
#[derive(Clone)]
pub struct Idp {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Token → when it expires.
    pub issued: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Idp {
    pub async fn start(opts: IdpOptions) -> Idp {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let issued = Arc::new(Mutex::new(HashMap::new()));
        let (c, s, i) = (calls.clone(), seen.clone(), issued.clone());
        let addr = tokengate::demo::serve_fn(any(), move |req| {
            let (calls, seen, issued, opts) = (c.clone(), s.clone(), i.clone(), opts.clone());
            async move {
                let req = capture(req).await;
                seen.lock().unwrap().push(req.clone());
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(opts.delay).await;
                if req.method != "POST" || req.path != "/token" {
                    return json(404, serde_json::json!({"error": "not_found"}));
                }
                if req.header("content-type").as_deref() != Some("application/x-www-form-urlencoded") {
                    return json(400, serde_json::json!({"error": "invalid_request", "error_description": "content-type"}));
                }
                let form = req.form();
                let authenticated = match opts.auth {
                    Auth::Basic => {
                        !form.contains_key("client_secret") && basic_matches(&req, &opts.client_id, &opts.client_secret)
                    }
                    Auth::Post => {
                        req.header("authorization").is_none()
                            && form.get("client_id") == Some(&opts.client_id)
                            && form.get("client_secret") == Some(&opts.client_secret)
                    }
                };
                if !authenticated {
                    return json(401, serde_json::json!({"error": "invalid_client", "error_description": "Invalid client credentials"}));
                }
                if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
                    return json(400, serde_json::json!({"error": "unsupported_grant_type"}));
                }
                if let Some(scope) = &opts.required_scope {
                    let want: std::collections::BTreeSet<&str> = scope.split(' ').collect();
                    let got: std::collections::BTreeSet<&str> =
                        form.get("scope").map(|s| s.split(' ').collect()).unwrap_or_default();
                    if want != got {
                        return json(400, serde_json::json!({"error": "invalid_scope"}));
                    }
                }
                let token = format!("tok-{n}-{:x}", rand::random::<u64>());
                issued.lock().unwrap().insert(token.clone(), Instant::now() + opts.lifetime);
                json(
                    200,
                    serde_json::json!({
                        "access_token": token,
                        "token_type": opts.token_type,
                        "expires_in": opts.lifetime.as_secs_f64().round() as u64,
                    }),
                )
            }
        })
        .await
        .unwrap();
        Idp { addr, calls, seen, issued }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// A configuration body: provider `idp` and one route `/` to `upstream`.
    pub fn config_to(&self, upstream: &str) -> String {
        format!(
            "{}routes:\n  - prefix: /\n    upstream: {upstream}\n    provider: idp\n",
            self.provider_yaml()
        )
    }

    /// One entry of a `providers:` section: provider `name` using this IdP's default client.
    pub fn provider_entry(&self, name: &str) -> String {
        format!(
            "  {name}:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\n",
            self.token_url()
        )
    }

    /// A `providers:` section with one provider `idp` using this IdP and its default client.
    pub fn provider_yaml(&self) -> String {
        format!(
            "providers:\n  idp:\n    type: oauth2\n    token_url: {}\n    client_id: client-1\n    client_secret: secret-1\n",
            self.token_url()
        )
    }

    /// True when `bearer` is a token this IdP issued and it has not expired.
    pub fn valid(&self, bearer: &str) -> bool {
        let token = bearer.strip_prefix("Bearer ").unwrap_or("");
        self.issued.lock().unwrap().get(token).is_some_and(|exp| Instant::now() < *exp)
    }
}

/// Checks `Authorization: Basic` per RFC 6749 §2.3.1: base64 of form-urlencoded id and secret.
pub fn basic_matches(req: &Seen, id: &str, secret: &str) -> bool {
    let Some(h) = req.header("authorization") else {
        return false;
    };
    let Some(b64) = h.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return false;
    };
    let Ok(pair) = String::from_utf8(raw) else {
        return false;
    };
    let Some((i, s)) = pair.split_once(':') else {
        return false;
    };
    let decode = |v: &str| -> String {
        form_urlencoded::parse(format!("x={v}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    decode(i) == id && decode(s) == secret && !pair.ends_with('\n')
}

/// An upstream that records each request and answers with a JSON echo. With an IdP, requests
/// without a currently valid token from it get 401.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start(idp: Option<Idp>) -> Upstream {
        Self::start_with(idp, Duration::ZERO).await
    }

    pub async fn start_with(idp: Option<Idp>, delay: Duration) -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let addr = tokengate::demo::serve_fn(any(), move |req| {
            let (seen, idp) = (s.clone(), idp.clone());
            async move {
                let req = capture(req).await;
                seen.lock().unwrap().push(req.clone());
                tokio::time::sleep(delay).await;
                if let Some(idp) = idp
                    && !idp.valid(&req.header("authorization").unwrap_or_default())
                {
                    return json(401, serde_json::json!({"error": "invalid_token"}));
                }
                let headers: serde_json::Map<String, serde_json::Value> = req
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned().into()))
                    .collect();
                json(
                    200,
                    serde_json::json!({
                        "method": req.method, "path": req.path, "query": req.query,
                        "headers": headers, "body": String::from_utf8_lossy(&req.body),
                    }),
                )
            }
        })
        .await
        .unwrap();
        Upstream { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Starts tokengate from YAML text (listeners on ephemeral loopback ports).
pub async fn start(yaml: &str) -> tokengate::server::Running {
    // The access log goes to stderr by default, which the test harness does not capture.
    let quiet = if yaml.contains("access_log:") { "" } else { "access_log: off\n" };
    let text = format!("listen: {ANY}\nadmin:\n  listen: {ANY}\n{quiet}{yaml}");
    let config = tokengate::config::parse(&text, "test.yaml").unwrap();
    tokengate::server::start(config).await.unwrap()
}

/// A plain HTTP client that never uses environment proxies.
pub fn client() -> reqwest::Client {
    builder().build().unwrap()
}

/// A client that opens a new connection for every request.
pub fn fresh_client() -> reqwest::Client {
    builder().pool_max_idle_per_host(0).build().unwrap()
}

pub fn h2_client() -> reqwest::Client {
    builder().http2_prior_knowledge().build().unwrap()
}

fn builder() -> reqwest::ClientBuilder {
    let tls = tokengate::tls::client_config(None, &[]).unwrap();
    reqwest::Client::builder().no_proxy().tls_backend_preconfigured(tls)
}

/// Waits until `/readyz` says ready.
pub async fn wait_ready(running: &tokengate::server::Running) {
    let url = format!("http://{}/readyz", running.admin_addr);
    let c = client();
    for _ in 0..200 {
        if c.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("tokengate did not become ready");
}

/// A JSON document of the admin listener (`/tokens`, `/status.json`).
pub async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    client().get(format!("http://{admin}{path}")).send().await.unwrap().json().await.unwrap()
}

/// The value of one series (name and labels, as exposed) on `admin`'s `/metrics`.
pub async fn metric_value(admin: SocketAddr, series: &str) -> Option<f64> {
    let text = client().get(format!("http://{admin}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// An address with nothing listening.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind(ANY).unwrap();
    l.local_addr().unwrap()
}

/// A throwaway PKI: a CA, a server certificate for 127.0.0.1/localhost and a client certificate.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// A second client certificate for the same name, for rotation.
    pub client2_cert_pem: String,
    pub client2_key_pem: String,
    pub ca_pem: String,
}

pub fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tokengate test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: &[&str], usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert_pem, server_key_pem) =
        leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert_pem, client_key_pem) = leaf(&["app.internal"], ExtendedKeyUsagePurpose::ClientAuth);
    let (client2_cert_pem, client2_key_pem) = leaf(&["app.internal"], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_pem = ca.pem();
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_cert_pem),
        server_key: write("server.key", &server_key_pem),
        client_cert_pem,
        client_key_pem,
        client2_cert_pem,
        client2_key_pem,
        ca_pem,
        dir,
    }
}

/// An HTTPS upstream answering 200 with a JSON echo.
pub async fn tls_upstream(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let (addr, seen, _) = tls_upstream_counted(cert, key).await;
    (addr, seen)
}

/// [`tls_upstream`], also counting the TLS handshakes it completed.
pub async fn tls_upstream_counted(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>, Arc<AtomicUsize>) {
    tls_upstream_offering(cert, key, &[b"h2", b"http/1.1"]).await
}

/// [`tls_upstream_counted`] offering `alpn` (hyper serves HTTP/1.1 and HTTP/2 either way).
pub async fn tls_upstream_offering(
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[&[u8]],
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>, Arc<AtomicUsize>) {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counter = handshakes.clone();
    let mut config = tokengate::tls::server_config(cert, key, None, false).unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen, counter) = (acceptor.clone(), s.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move {
                        let req = capture(req).await;
                        seen.lock().unwrap().push(req.clone());
                        Ok::<_, std::convert::Infallible>(json(200, serde_json::json!({"path": req.path})))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen, handshakes)
}

/// An HTTPS client trusting `ca_pem`, presenting a client certificate when given.
pub fn tls_client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).map(|c| c.unwrap()).collect();
            builder
                .with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder().no_proxy().tls_backend_preconfigured(config).build().unwrap()
}

/// Sends raw bytes and returns everything the server sends back until it closes or goes quiet.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the admin listener at `admin` answers `/readyz` with 200 (about 5 s at most).
pub async fn wait_ready_at(admin: SocketAddr) {
    let c = client();
    for _ in 0..250 {
        if c.get(format!("http://{admin}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("tokengate at {admin} did not become ready");
}

/// The real `tokengate run` binary on a configuration file, killed on drop. Its stderr goes to
/// `tokengate.log` beside the configuration file.
pub struct Process {
    pub child: std::process::Child,
    pub admin: SocketAddr,
    pub log: std::path::PathBuf,
}

impl Process {
    pub fn spawn(config_path: &std::path::Path, admin: SocketAddr) -> Process {
        let log = config_path.with_file_name("tokengate.log");
        let stderr = std::fs::File::create(&log).unwrap().into();
        let mut p = Process::spawn_with(config_path, admin, &[], stderr);
        p.log = log;
        p
    }

    /// [`Process::spawn`] with environment variables set.
    pub fn spawn_env(config_path: &std::path::Path, admin: SocketAddr, vars: &[(&str, &str)]) -> Process {
        let log = config_path.with_file_name("tokengate.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["run", "-c", config_path.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .envs(vars.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process { child, admin, log }
    }

    /// `tokengate run -c config_path` with more arguments, its stderr going to `stderr`
    /// ([`Process::log_text`] then reads nothing).
    pub fn spawn_with(
        config_path: &std::path::Path,
        admin: SocketAddr,
        args: &[&str],
        stderr: std::process::Stdio,
    ) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["run", "-c", config_path.to_str().unwrap()])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Process { child, admin, log: std::path::PathBuf::new() }
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    pub async fn ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        for _ in 0..250 {
            if client().get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("tokengate process did not become ready; log:\n{}", self.log_text());
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 5 s for a log line containing `needle` (lines reach the file through a
    /// writer thread) and returns the log; panics with the log if none comes.
    pub async fn logged(&self, needle: &str) -> String {
        for _ in 0..250 {
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line with {needle:?}:\n{}", self.log_text());
    }

    /// Waits up to `limit` for the process to exit; its exit code, or `None` if it is still running.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<Option<i32>> {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Says, in the normal test output, that a test cannot run because `tool` is missing (libtest
/// captures `println!`, not a direct write to stderr). In CI (`CI` set) a missing tool fails.
pub fn skipped(tool: &str, install: &str) {
    use std::io::Write;
    assert!(std::env::var_os("CI").is_none(), "{tool} must be installed in CI ({install})");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {tool} is not installed ({install}); the test did not run");
}

/// The Chromium binary, if one is installed.
pub fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Headless Chromium with the flags a closed network needs (no background connections).
pub fn headless(browser: &str, profile: &std::path::Path, extra: &[&str], url: &str) -> std::process::Output {
    std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}
