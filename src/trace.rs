//! OpenTelemetry traces of proxied requests (`tracing:` in the configuration; off without it).
//!
//! A traced request has a server span (route, caller, status, upstream), with a child span for
//! each token fetch it waited for and each upstream exchange (a 401 replay is a second one). An
//! incoming W3C `traceparent` is continued: its trace, and its sampling decision. The upstream
//! gets a `traceparent` naming its exchange span; `tracestate` passes through. Spans leave in
//! batches over OTLP/HTTP (protobuf) from the SDK's own thread; a full queue drops spans rather
//! than slow requests. Untraced requests pass the client's `traceparent` on untouched. No token,
//! secret or query string is put in a span.

use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::Tracing;

/// The `traceparent` header (W3C Trace Context).
const TRACEPARENT: &str = "traceparent";

/// The tracer of a running instance.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("tracing.otlp_endpoint: {0}")]
pub struct TraceError(String);

impl Traces {
    /// A tracer exporting to `config.otlp_endpoint`.
    pub fn start(config: &Tracing) -> Result<Traces, TraceError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http_client()?)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.otlp_endpoint.0.clone())
            .build()
            .map_err(|e| TraceError(e.to_string()))?;
        let name = config.service_name.as_ref().map_or_else(|| "tokengate".to_owned(), |n| n.0.clone());
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio.0)));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tokengate");
        Ok(Traces { provider, tracer })
    }

    /// The span of a request with these headers, when it is sampled.
    pub fn request(&self, headers: &HeaderMap, method: &http::Method, path: &str) -> Option<Traced> {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(format!("{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        if !span.span_context().is_sampled() {
            return None;
        }
        Some(Traced { cx: parent.with_span(span), tracer: self.tracer.clone() })
    }

    /// Sends the spans still queued and stops the exporter (blocks; call off the async workers).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces: the last spans could not be sent");
        }
    }
}

/// The exporter's client, with tokengate's TLS settings (ring, the public roots) and no proxy
/// from the environment. It is built on a thread of its own: a blocking client must not be made
/// on an async worker.
fn http_client() -> Result<reqwest::blocking::Client, TraceError> {
    let tls = crate::tls::client_config(None, &[b"http/1.1"]).map_err(|e| TraceError(e.to_string()))?;
    let build = move || {
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .timeout(std::time::Duration::from_secs(10))
            .build()
    };
    match std::thread::spawn(build).join() {
        Ok(built) => built.map_err(|e| TraceError(e.to_string())),
        Err(_) => Err(TraceError("the HTTP client could not be built".into())),
    }
}

/// A sampled request: its span and what makes its children.
pub struct Traced {
    cx: Context,
    tracer: SdkTracer,
}

/// What a request's span says when it ends.
pub struct Outcome<'a> {
    /// The route's label (`_unmatched` when none).
    pub route: &'a str,
    /// The caller's name, when one was identified.
    pub caller: Option<&'a str>,
    /// The response status.
    pub status: u16,
    /// The route's upstream URL.
    pub upstream: Option<&'a str>,
    /// The route's provider.
    pub provider: Option<&'a str>,
    /// The `error` code of tokengate's own answer, if it made one.
    pub error: Option<&'static str>,
}

impl Traced {
    /// A child span for waiting on `provider`'s token.
    fn token_fetch(&self, provider: &str) -> Child {
        let attributes = [KeyValue::new("tokengate.provider", provider.to_owned())];
        self.child("token fetch", SpanKind::Internal, attributes)
    }

    /// A child span for one upstream exchange; `headers` (the upstream request's) get the
    /// `traceparent` that names it.
    pub fn upstream(&self, headers: &mut HeaderMap, upstream: &str) -> Child {
        let child =
            self.child("upstream", SpanKind::Client, [KeyValue::new("url.full", upstream.to_owned())]);
        let sc = child.cx.span().span_context().clone();
        let value = format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(TRACEPARENT, value);
        }
        child
    }

    fn child<const N: usize>(&self, name: &'static str, kind: SpanKind, attributes: [KeyValue; N]) -> Child {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(SystemTime::now())
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        Child { cx: self.cx.with_span(span) }
    }

    /// Ends the request's span with what happened.
    pub fn finish(self, outcome: &Outcome<'_>) {
        let Outcome { route, caller, status, upstream, provider, error } = *outcome;
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        span.set_attribute(KeyValue::new("tokengate.route", route.to_owned()));
        let optional = [
            ("tokengate.caller", caller),
            ("tokengate.upstream", upstream),
            ("tokengate.provider", provider),
            ("tokengate.error", error),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                span.set_attribute(KeyValue::new(key, value.to_owned()));
            }
        }
        if status >= 500 {
            span.set_status(Status::error(error.unwrap_or("server error")));
        }
        span.end();
    }
}

/// Awaits `fetch`, a wait for `provider`'s token, inside a `token fetch` span when the request is
/// traced; `ok` says whether what it gave is a token.
pub async fn fetching<F: std::future::Future>(
    trace: Option<&Traced>,
    provider: &str,
    fetch: F,
    ok: impl FnOnce(&F::Output) -> bool,
) -> F::Output {
    let span = trace.map(|t| t.token_fetch(provider));
    let got = fetch.await;
    if let Some(span) = span {
        span.done(ok(&got));
    }
    got
}

/// A child span in progress.
pub struct Child {
    cx: Context,
}

impl Child {
    /// Ends an upstream exchange with the upstream's status.
    pub fn responded(self, status: u16) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 {
            span.set_status(Status::error("upstream server error"));
        }
        span.end();
    }

    /// Ends it, as done or as failed.
    pub fn done(self, ok: bool) {
        let span = self.cx.span();
        if !ok {
            span.set_status(Status::error("failed"));
        }
        span.end();
    }
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
