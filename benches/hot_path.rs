//! Micro-benchmarks of the request hot path: route lookup, header rewrite, cached token reads
//! under contention. `cargo bench --bench hot_path`; they print, they never fail on a number.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use tokengate::route::{RouteTable, check_path};

fn table(n: usize) -> RouteTable<usize> {
    let mut t = RouteTable::default();
    for i in 0..n {
        t.insert(&format!("/tenant{i}/api/v{}", i % 3), i);
    }
    t
}

fn route_lookup(c: &mut Criterion) {
    for n in [10, 1000] {
        let t = table(n);
        let path = format!("/tenant{}/api/v{}/users/42/orders", n / 2, (n / 2) % 3);
        c.bench_function(&format!("route lookup, {n} routes"), |b| {
            b.iter(|| black_box(t.lookup(black_box(&path))))
        });
    }
    let path = "/coreview/eu/api/v1/users/42/orders?page=2";
    c.bench_function("path check", |b| b.iter(|| black_box(check_path(black_box(path)))));
}

fn header_rewrite(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "tokengate:8080"),
        ("user-agent", "legacy-app/1.0"),
        ("accept", "application/json"),
        ("authorization", "Basic Y2xpZW50OnNlY3JldA=="),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
        ("x-request-id", "5f2c9a1e-7b3d-4c1a-9e8f-0a1b2c3d4e5f"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    let token = HeaderValue::from_static(
        "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig",
    );
    let hop = tokengate::proxy::headers::Forwarding {
        client: "10.1.2.3".parse().unwrap(),
        trusted: false,
        proto: "http",
        authority: None,
        format: Default::default(),
        version: "1.1",
    };
    c.bench_function("request header rewrite", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                tokengate::proxy::headers::rewrite_request(&mut h, &hop, Some(token.clone()));
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn token_reads(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let source = rt.block_on(async {
        let idp = tokengate::demo::token_endpoint(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let text = format!(
            "providers:\n  p:\n    type: oauth2\n    token_url: http://{idp}/token\n    client_id: {}\n    client_secret: {}\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: p\n",
            tokengate::demo::CLIENT_ID,
            tokengate::demo::CLIENT_SECRET
        );
        let config = tokengate::config::parse(&text, "bench.yaml").unwrap();
        let source = tokengate::token::TokenSource::new("p", &config.providers["p"], tokengate::metrics::Metrics::new(), None).unwrap();
        source.get().await.unwrap();
        source
    });
    c.bench_function("cached token read, 1 task", |b| b.iter(|| black_box(source.usable())));
    c.bench_function("cached token read, 64 tasks x 1000 reads", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..64 {
                    let s = Arc::clone(&source);
                    tasks.spawn(async move {
                        for _ in 0..1000 {
                            black_box(s.usable());
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            })
        })
    });
}

/// Telling the caller of a request apart, by API key and by an ES256 service-account JWT (keys
/// from a JWKS file), side by side.
fn caller_identification(c: &mut Criterion) {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw().to_vec();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    std::fs::write(dir.path().join("keys"), "billing-key-0000000001\n").unwrap();
    let text = format!(
        "callers:\n  billing: {{ api_keys_file: {d}/keys }}\n  batch:\n    jwt:\n      issuer: https://k8s\n      jwks_file: {d}/jwks.json\n      audiences: [tokengate]\nproviders:\n  p: {{ type: static, value: v }}\nroutes:\n  - prefix: /\n    upstream: http://127.0.0.1:9\n    provider: p\n",
        d = dir.path().display()
    );
    let config = tokengate::config::parse(&text, "bench.yaml").unwrap();
    let identify =
        tokengate::caller::Identify::new(&config.callers, http::HeaderName::from_static("x-api-key"))
            .unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = serde_json::json!({"iss": "https://k8s", "sub": "system:serviceaccount:batch:a", "aud": ["tokengate"], "exp": exp});
    let jwt =
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()))
            .unwrap();
    let remote: std::net::IpAddr = [10, 0, 0, 1].into();
    let mut by_key = HeaderMap::new();
    by_key.insert("x-api-key", HeaderValue::from_static("billing-key-0000000001"));
    let mut by_jwt = HeaderMap::new();
    by_jwt.insert("authorization", HeaderValue::from_str(&format!("Bearer {jwt}")).unwrap());
    assert!(rt.block_on(identify.identify(&by_jwt, remote, None)).unwrap().is_some());
    c.bench_function("caller by API key", |b| {
        b.iter(|| rt.block_on(async { black_box(identify.identify(&by_key, remote, None).await.is_ok()) }))
    });
    c.bench_function("caller by ES256 JWT", |b| {
        b.iter(|| rt.block_on(async { black_box(identify.identify(&by_jwt, remote, None).await.is_ok()) }))
    });
}

criterion_group!(benches, route_lookup, header_rewrite, token_reads, caller_identification);
criterion_main!(benches);
