//! Named callers: requests told apart by API key or by a validated JWT (Kubernetes
//! service-account style, keys served as JWKS over HTTPS with a private CA), routes that serve
//! only some callers, and a provider per caller.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;

/// A signing key of the issuer, with its JWK.
struct SigningKey {
    kid: String,
    der: Vec<u8>,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let (x, y) = (&raw[1..33], &raw[33..65]);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        });
        SigningKey { kid: kid.to_owned(), der: key.serialize_der(), jwk }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.der);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

/// An issuer like the Kubernetes API server: OpenID configuration and JWKS over HTTPS.
struct Issuer {
    url: String,
    keys: Arc<Mutex<Vec<serde_json::Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl Issuer {
    async fn start(pki: &Pki) -> Issuer {
        let config = tokengate::tls::server_config(&pki.server_cert, &pki.server_key, None, false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
        let url = format!("https://localhost:{}", listener.local_addr().unwrap().port());
        let keys: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f, u) = (keys.clone(), fetches.clone(), url.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, keys, fetches, url) = (acceptor.clone(), k.clone(), f.clone(), u.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let body = match req.uri().path() {
                            "/.well-known/openid-configuration" => {
                                serde_json::json!({ "issuer": url, "jwks_uri": format!("{url}/openid/v1/jwks") })
                            }
                            _ => {
                                fetches.fetch_add(1, Ordering::SeqCst);
                                serde_json::json!({ "keys": *keys.lock().unwrap() })
                            }
                        };
                        async move { Ok::<_, std::convert::Infallible>(json(200, body)) }
                    });
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                });
            }
        });
        Issuer { url, keys, fetches }
    }

    fn publish(&self, key: &SigningKey) {
        self.keys.lock().unwrap().push(key.jwk.clone());
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Service-account-style claims.
fn claims(iss: &str, sub: &str, aud: &str, exp: u64) -> serde_json::Value {
    serde_json::json!({ "iss": iss, "sub": sub, "aud": [aud], "exp": exp, "iat": now(), "nbf": now() - 5 })
}

async fn call(tg: &tokengate::server::Running, bearer: &str) -> (u16, serde_json::Value) {
    let r = client()
        .get(format!("http://{}/api/x", tg.proxy_addr))
        .header("authorization", format!("Bearer {bearer}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn service_account_tokens_are_validated_against_the_issuers_keys() {
    let pki = pki();
    let issuer = Issuer::start(&pki).await;
    let key = SigningKey::new("k1");
    issuer.publish(&key);
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let yaml = format!(
        "callers:\n  batch:\n    jwt:\n      issuer: {}\n      ca_file: {}\n      audiences: [tokengate]\n      subjects: [\"system:serviceaccount:batch:*\"]\n{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n",
        issuer.url,
        pki.ca.display(),
        idp.provider_yaml(),
        up.url()
    );
    let tg = start(&yaml).await;
    let sa = "system:serviceaccount:batch:runner";
    let good = key.sign(&claims(&issuer.url, sa, "tokengate", now() + 600));
    let (status, body) = call(&tg, &good).await;
    assert_eq!(status, 200, "{body}");
    let seen = up.requests().pop().unwrap();
    let sent = seen.header("authorization").unwrap();
    assert!(idp.valid(&sent) && !sent.contains(&good), "the caller's own token must not reach the upstream");

    // Rotation: a new key, published after tokengate read the set, is fetched when a token names it.
    let rotated = SigningKey::new("k2");
    issuer.publish(&rotated);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = call(&tg, &rotated.sign(&claims(&issuer.url, sa, "tokengate", now() + 600))).await;
    assert_eq!(status, 200, "the rotated key was not picked up: {body}");

    let header_b64 = |h: serde_json::Value| URL_SAFE_NO_PAD.encode(h.to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims(&issuer.url, sa, "tokengate", now() + 600).to_string());
    let alg_none = format!("{}.{payload}.", header_b64(serde_json::json!({"alg": "none", "kid": "k1"})));
    // HS256 "signed" with the public key, the classic confusion attack.
    let hs256 = {
        let signing_input =
            format!("{}.{payload}", header_b64(serde_json::json!({"alg": "HS256", "kid": "k1"})));
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.jwk.to_string().as_bytes()),
            signing_input.as_bytes(),
        );
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    };
    let stranger = SigningKey::new("k1");
    let refused = [
        ("expired", key.sign(&claims(&issuer.url, sa, "tokengate", now() - 120)), "expired"),
        ("wrong audience", key.sign(&claims(&issuer.url, sa, "other-service", now() + 600)), "audience"),
        ("wrong issuer", key.sign(&claims("https://evil.example", sa, "tokengate", now() + 600)), "issuer"),
        ("alg none", alg_none, "alg"),
        ("HS256 with the public key", hs256, "alg"),
        (
            "another key, same kid",
            stranger.sign(&claims(&issuer.url, sa, "tokengate", now() + 600)),
            "signature",
        ),
        (
            "unknown kid",
            SigningKey::new("k9").sign(&claims(&issuer.url, sa, "tokengate", now() + 600)),
            "unknown key id",
        ),
    ];
    let forwarded = up.requests().len();
    for (what, token, reason) in refused {
        let (status, body) = call(&tg, &token).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "invalid_token", "{what}: {body}");
        assert!(body["message"].as_str().unwrap().contains(reason), "{what}: {body}");
        assert!(!body.to_string().contains(&token), "{what}: the token is echoed");
    }
    // A valid token of a service account the caller does not cover is no caller.
    let other_sa =
        key.sign(&claims(&issuer.url, "system:serviceaccount:web:frontend", "tokengate", now() + 600));
    let (status, body) = call(&tg, &other_sa).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("caller_unknown")), "{body}");
    assert_eq!(up.requests().len(), forwarded, "a refused request reached the upstream");
    assert!(
        issuer.fetches.load(Ordering::SeqCst) <= 4,
        "made-up key ids must not make tokengate fetch every time"
    );
    tg.shutdown().await;
}

/// A file of keys, one per line.
fn keys_file(dir: &std::path::Path, name: &str, keys: &[&str]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, keys.join("\n")).unwrap();
    p
}

#[tokio::test]
async fn each_caller_gets_its_own_provider_and_only_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let billing = keys_file(dir.path(), "billing", &["billing-key-0000000001", "billing-key-0000000002"]);
    let reports = keys_file(dir.path(), "reports", &["reports-key-0000000001"]);
    let (idp_billing, idp_reports) =
        (Idp::start(IdpOptions::default()).await, Idp::start(IdpOptions::default()).await);
    let up = Upstream::start(None).await;
    let yaml = format!(
        "callers:\n  billing: {{ api_keys_file: {} }}\n  reports: {{ api_keys_file: {} }}\nproviders:\n{}{}routes:\n  - prefix: /covata\n    upstream: {u}\n    provider: billing-idp\n    callers: [billing, reports]\n    provider_by_caller: {{ reports: reports-idp }}\n  - prefix: /ledger\n    upstream: {u}\n    provider: billing-idp\n    callers: [billing]\n",
        billing.display(),
        reports.display(),
        idp_billing.provider_entry("billing-idp"),
        idp_reports.provider_entry("reports-idp"),
        u = up.url()
    );
    let tg = start(&yaml).await;
    let send = |path: &'static str, key: &'static str| {
        let addr = tg.proxy_addr;
        async move {
            let r = client()
                .get(format!("http://{addr}{path}"))
                .header("x-api-key", key)
                .header("x-who", key)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    // Both callers at once, many times: every request carries its own caller's token.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let key = if i % 2 == 0 { "billing-key-0000000002" } else { "reports-key-0000000001" };
        tasks.push(tokio::spawn(send("/covata/x", key)));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().0, 200);
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 200);
    for s in &seen {
        let token = s.header("authorization").unwrap();
        let who = s.header("x-who").unwrap();
        let (mine, theirs) = if who.starts_with("billing") {
            (&idp_billing, &idp_reports)
        } else {
            (&idp_reports, &idp_billing)
        };
        assert!(mine.valid(&token) && !theirs.valid(&token), "{who} carried another caller's token");
        assert_eq!(s.header("x-api-key"), None, "the caller's key reached the upstream");
    }

    let (status, body) = send("/ledger/x", "reports-key-0000000001").await;
    assert_eq!((status, body["error"].as_str()), (403, Some("caller_not_allowed")), "{body}");
    let (status, body) = send("/ledger/x", "billing-key-0000000001").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send("/covata/x", "nobody-key-00000000000").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("caller_unknown")), "{body}");

    let series = "tokengate_caller_requests_total{caller=\"reports\",route=\"/covata\",status=\"200\"}";
    assert_eq!(metric_value(tg.admin_addr, series).await, Some(100.0));
    let status = admin_json(tg.admin_addr, "/status.json").await;
    let rows = status["callers"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["caller"] == "billing" && r["route"] == "/covata" && r["requests"] == 100),
        "{status}"
    );
    tg.shutdown().await;
}

#[test]
fn caller_mistakes_are_named_with_their_key() {
    let parse = |yaml: &str| {
        let text = format!(
            "providers:\n  p:\n    type: static\n    value: v\n{yaml}routes:\n  - prefix: /a\n    upstream: https://api.example\n    provider: p\n"
        );
        tokengate::config::parse(&text, "t.yaml").map(|_| ()).unwrap_err().to_string()
    };
    let route_keys = |keys: &str| {
        let text = format!(
            "callers:\n  ops: {{ allow: [10.0.0.0/8] }}\nproviders:\n  p:\n    type: static\n    value: v\nroutes:\n  - prefix: /a\n    upstream: https://api.example\n    provider: p\n{keys}"
        );
        tokengate::config::parse(&text, "t.yaml").map(|_| ()).unwrap_err().to_string()
    };
    let e = route_keys("    callers: [opz]\n");
    assert!(
        e.contains("routes[0].callers") && e.contains("no caller named \"opz\"") && e.contains("ops"),
        "{e}"
    );
    let e = route_keys("    provider_by_caller: { ops: nope }\n");
    assert!(e.contains("routes[0].provider_by_caller.ops") && e.contains("no provider named"), "{e}");
    let e = parse("callers:\n  k8s:\n    jwt:\n      issuer: https://k8s\n");
    assert!(e.contains("audiences"), "{e}");
    let e = parse(
        "callers:\n  k8s:\n    jwt:\n      issuer: https://k8s\n      audiences: [a]\n      algorithms: [HS256]\n",
    );
    assert!(e.contains("HS256") && e.contains("not one of"), "{e}");
    let e = parse("callers:\n  nobody: {}\n");
    assert!(
        e.contains("callers.nobody") && e.contains("needs api_keys_file, jwt, client_cert or allow"),
        "{e}"
    );
    let e = parse("callers:\n  both: { allow: [10.0.0.0/8], require: [jwt] }\n");
    assert!(e.contains("require lists"), "{e}");
}

/// A caller known by its client certificate's DNS name, through the TLS listener; the same
/// request without the certificate is no caller.
#[tokio::test]
async fn a_caller_is_known_by_its_client_certificate() {
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let yaml = format!(
        "tls:\n  listen: 127.0.0.1:0\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n  client_cert: optional\ncallers:\n  app: {{ client_cert: {{ san_dns: app.internal }} }}\n{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display(),
        idp.provider_yaml(),
        up.url()
    );
    let tg = start(&yaml).await;
    let url = format!("https://localhost:{}/api/x", tg.tls_addr.unwrap().port());
    let with_cert = tls_client(&pki.ca_pem, Some((&pki.client_cert_pem, &pki.client_key_pem)));
    let r = with_cert.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = tls_client(&pki.ca_pem, None).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "caller_unknown");
    assert_eq!(up.requests().len(), 1);
    let series = "tokengate_caller_requests_total{caller=\"app\",route=\"/api\",status=\"200\"}";
    assert_eq!(metric_value(tg.admin_addr, series).await, Some(1.0));
    tg.shutdown().await;
}

/// An issuer whose keys cannot be read makes its tokens uncheckable, not invalid: 503 with
/// Retry-After, and nothing forwarded.
#[tokio::test]
async fn tokens_of_an_unreachable_issuer_get_503_not_401() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let down = closed_port();
    let yaml = format!(
        "callers:\n  batch:\n    jwt:\n      issuer: https://k8s.example\n      jwks_uri: http://{down}/keys\n      audiences: [tokengate]\n{}routes:\n  - prefix: /api\n    upstream: {}\n    provider: idp\n",
        idp.provider_yaml(),
        up.url()
    );
    let tg = start(&yaml).await;
    let token = SigningKey::new("k1").sign(&claims("https://k8s.example", "sa", "tokengate", now() + 600));
    let r = client()
        .get(format!("http://{}/api/x", tg.proxy_addr))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "caller_keys_unavailable", "{body}");
    assert!(up.requests().is_empty());
    tg.shutdown().await;
}
