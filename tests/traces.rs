//! OpenTelemetry traces over OTLP/HTTP: the spans of a proxied request arrive at a receiver that
//! decodes the real export requests (protobuf, with the OpenTelemetry project's own message
//! types), as a parent/child tree that continues the caller's W3C trace; the upstream gets a
//! `traceparent` naming its exchange span.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

/// One span as exported, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    attributes: Vec<(String, String)>,
    error: bool,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP traces receiver: POST /v1/traces, protobuf bodies.
struct Receiver {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
}

async fn receiver() -> Receiver {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let s = spans.clone();
    let addr = tokengate::demo::serve_fn(any(), move |req| {
        let spans = s.clone();
        async move {
            let req = capture(req).await;
            let protobuf = req.header("content-type").as_deref() == Some("application/x-protobuf");
            if req.method != "POST" || req.path != "/v1/traces" || !protobuf {
                return json(400, serde_json::json!({"error": "not an OTLP/HTTP protobuf export"}));
            }
            let export = ExportTraceServiceRequest::decode(req.body.as_ref()).unwrap();
            spans.lock().unwrap().extend(flatten(export));
            let mut ok = json(200, serde_json::json!({}));
            *ok.body_mut() = http_body_util::Full::new(bytes::Bytes::new());
            ok.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
            ok
        }
    })
    .await
    .unwrap();
    Receiver { addr, spans }
}

fn flatten(export: ExportTraceServiceRequest) -> Vec<Exported> {
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    };
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
            out.push(Exported {
                service: service.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
                attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                error: span.status.is_some_and(|s| s.code == 2),
            });
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn config(idp: &Idp, up: &Upstream, rx: &Receiver, ratio: &str) -> String {
    format!(
        "{}tracing:\n  otlp_endpoint: http://{}\n  sample_ratio: {ratio}\n  service_name: gateway-a\n",
        idp.config_to(&up.url()),
        rx.addr
    )
}

/// A request whose token the upstream refuses: a span for the request, one for each upstream
/// exchange (401, then 200 after the replay), one for the new token, all in the caller's trace.
#[tokio::test]
async fn a_request_is_one_span_tree_in_the_callers_trace() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(Some(idp.clone())).await;
    let rx = receiver().await;
    let tg = start(&config(&idp, &up, &rx, "0")).await;
    wait_ready(&tg).await;
    // The cached token stops being valid: the upstream answers 401 and tokengate fetches anew.
    idp.issued.lock().unwrap().clear();
    let r = client()
        .get(format!("http://{}/orders?id=7", tg.proxy_addr))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "the 401 and the replay");
    let parents: Vec<String> = seen.iter().map(|s| s.header("traceparent").unwrap()).collect();
    for p in &parents {
        let parts: Vec<&str> = p.split('-').collect();
        assert!(parts.len() == 4 && parts[0] == "00" && parts[1] == TRACE && parts[3] == "01", "{p}");
        assert_ne!(parts[2], CALLER_SPAN, "the upstream's parent is tokengate's exchange span");
    }
    assert_ne!(parents[0], parents[1], "each exchange is a span of its own");
    assert!(seen.iter().all(|s| s.header("tracestate").as_deref() == Some("vendor=opaque")));
    tg.shutdown().await;

    let spans = rx.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == TRACE && s.service == "gateway-a"), "{spans:#?}");
    let server: Vec<&Exported> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    let request = server[0];
    assert_eq!(request.parent, CALLER_SPAN);
    assert_eq!(request.attribute("http.response.status_code"), Some("200"));
    assert_eq!(request.attribute("tokengate.route"), Some("/"));
    assert_eq!(request.attribute("tokengate.provider"), Some("idp"));
    assert_eq!(request.attribute("tokengate.upstream"), Some(up.url().as_str()));
    assert_eq!(request.attribute("url.path"), Some("/orders"));
    let children: Vec<&Exported> = spans.iter().filter(|s| s.parent == request.span_id).collect();
    assert_eq!(children.len(), 3, "{spans:#?}");
    let exchanges: Vec<&Exported> =
        children.iter().copied().filter(|s| s.kind == SpanKind::Client as i32).collect();
    let ids: Vec<String> = parents.iter().map(|p| p.split('-').nth(2).unwrap().to_owned()).collect();
    assert_eq!(exchanges.iter().map(|s| s.span_id.clone()).collect::<Vec<_>>(), ids, "{spans:#?}");
    let statuses: Vec<Option<&str>> =
        exchanges.iter().map(|s| s.attribute("http.response.status_code")).collect();
    assert_eq!(statuses, [Some("401"), Some("200")]);
    let fetch = children.iter().find(|s| s.name == "token fetch").unwrap();
    assert_eq!(fetch.attribute("tokengate.provider"), Some("idp"));
    assert!(spans.iter().all(|s| !s.error));
    // Nothing secret or from the query string in any span.
    let everything = format!("{spans:?}");
    for secret in ["tok-", "secret-1", "id=7", "Bearer"] {
        assert!(!everything.contains(secret), "{secret} in {everything}");
    }
}

/// The caller's sampling decision holds; without one, `sample_ratio` decides. Untraced requests
/// keep the caller's `traceparent` as it was.
#[tokio::test]
async fn the_callers_decision_and_the_ratio_choose_what_is_traced() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = Upstream::start(None).await;
    let rx = receiver().await;
    let tg = start(&config(&idp, &up, &rx, "0")).await;
    wait_ready(&tg).await;
    let unsampled = format!("00-{TRACE}-{CALLER_SPAN}-00");
    let get = |proxy: std::net::SocketAddr, traceparent: Option<String>| {
        let mut r = client().get(format!("http://{proxy}/x"));
        if let Some(t) = traceparent {
            r = r.header("traceparent", t);
        }
        r.send()
    };
    assert_eq!(get(tg.proxy_addr, Some(unsampled.clone())).await.unwrap().status(), 200);
    assert_eq!(get(tg.proxy_addr, None).await.unwrap().status(), 200);
    let seen = up.requests();
    assert_eq!(seen[0].header("traceparent"), Some(unsampled));
    assert_eq!(seen[1].header("traceparent"), None);
    tg.shutdown().await;
    assert!(rx.spans.lock().unwrap().is_empty());

    // Ratio 1: a request without a traceparent starts a trace of its own.
    let rx = receiver().await;
    let tg = start(&config(&idp, &up, &rx, "1")).await;
    wait_ready(&tg).await;
    assert_eq!(get(tg.proxy_addr, None).await.unwrap().status(), 200);
    let sent = up.requests().last().unwrap().header("traceparent").unwrap();
    tg.shutdown().await;
    let spans = rx.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let root = spans.iter().find(|s| s.kind == SpanKind::Server as i32).unwrap();
    assert!(root.parent.is_empty(), "{root:?}");
    assert!(sent.contains(&root.trace_id), "{sent}");
}

#[test]
fn tracing_settings_are_checked_at_load() {
    let base = "providers:\n  idp:\n    type: oauth2\n    token_url: https://idp/t\n    client_id: a\n    client_secret: b\nroutes:\n  - prefix: /\n    upstream: https://api\n    provider: idp\n";
    for (tracing, problem) in [
        ("tracing:\n  otlp_endpoint: ftp://collector\n", "tracing.otlp_endpoint"),
        ("tracing:\n  otlp_endpoint: http://c:4318\n  sample_ratio: 2\n", "tracing.sample_ratio"),
        ("tracing:\n  sample_ratio: 0.5\n", "otlp_endpoint"),
    ] {
        let err = tokengate::config::parse(&format!("{base}{tracing}"), "t.yaml").unwrap_err().to_string();
        assert!(err.contains(problem), "{tracing}: {err}");
    }
    let ok = tokengate::config::parse(&format!("{base}tracing:\n  otlp_endpoint: http://c:4318\n"), "t.yaml")
        .unwrap();
    assert_eq!(ok.tracing.unwrap().otlp_endpoint.0, "http://c:4318/v1/traces");
}
