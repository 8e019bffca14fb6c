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

criterion_group!(benches, route_lookup, header_rewrite, token_reads);
criterion_main!(benches);
