//! The request path. Each request goes through the same short sequence of steps:
//! admit → match route → attach credential → rewrite → forward → map errors → record.

pub mod admit;
pub mod body;
pub mod error;
pub mod headers;
pub mod upstream;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub use admit::{Conn, Denied};
pub use error::ProxyError;

use crate::config::{Config, Limits, Upstream};
use crate::metrics::{Metrics, RouteMetrics};
use crate::route::{self, RouteTable};
use crate::token::{Providers, TokenSource};

pub use body::Body;
/// Error type of streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A route ready to serve.
pub struct Route {
    /// Metrics and log label.
    pub label: String,
    /// The normalised prefix.
    pub prefix: String,
    /// Where requests go.
    pub upstream: Upstream,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Whose token is attached.
    pub provider: Arc<TokenSource>,
    /// Headers set on every upstream request.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Replay once with a new token after a 401.
    pub retry_on_401: bool,
    /// Request metrics, resolved once.
    pub metrics: RouteMetrics,
    /// Allowed client blocks (empty: any).
    pub allow: Vec<crate::config::Cidr>,
    /// Allowed methods (empty: any).
    pub methods: Vec<Method>,
    /// An inbound API key is required.
    pub require_api_key: bool,
    /// A verified client certificate is required.
    pub require_client_cert: bool,
    client: upstream::UpstreamClient,
}

/// What a configuration turns into: the route table and its token sources. Swapped whole on
/// reload, so a request sees one consistent version from start to end.
pub struct Runtime {
    /// Routes by prefix.
    pub table: RouteTable<Arc<Route>>,
    /// Token sources by provider name.
    pub providers: Providers,
    /// Limits in force.
    pub limits: Limits,
    /// Access rules of the plain listener and route defaults.
    pub access: crate::config::Access,
    /// Allowed client blocks on the TLS listener.
    pub tls_allow: Vec<crate::config::Cidr>,
    /// Allowed client blocks on the forward-proxy listener.
    pub forward_allow: Vec<crate::config::Cidr>,
    /// Routes by upstream authority (`host:port` and bare `host`), for the forward proxy.
    pub by_host: std::collections::HashMap<String, Vec<Arc<Route>>>,
}

impl Runtime {
    /// Builds routes for `config` on top of already-built token sources.
    pub fn build(config: &Config, providers: Providers, metrics: &Metrics) -> Result<Self, String> {
        let mut clients = upstream::Clients::default();
        let mut table = RouteTable::default();
        let mut by_host: std::collections::HashMap<String, Vec<Arc<Route>>> =
            std::collections::HashMap::new();
        for r in &config.routes {
            let provider = providers
                .get(&r.provider.0)
                .cloned()
                .ok_or_else(|| format!("route {}: unknown provider {}", r.label(), r.provider.0))?;
            let client = clients
                .get(&config.limits, r.ca_file.as_ref())
                .map_err(|e| format!("route {}: {e}", r.label()))?;
            let route = Route {
                label: r.label().to_owned(),
                prefix: r.prefix.as_str().to_owned(),
                upstream: r.upstream.clone(),
                strip_prefix: r.strip_prefix,
                provider,
                headers: r.headers.clone(),
                retry_on_401: r.retry_on_401,
                metrics: RouteMetrics::new(metrics, r.label()),
                allow: r.allow.clone(),
                methods: r.methods.clone(),
                require_api_key: r.require_api_key.unwrap_or(config.access.api_keys.is_some()),
                require_client_cert: r.require_client_cert,
                client,
            };
            let route = Arc::new(route);
            let authority = route.upstream.authority.as_str().to_ascii_lowercase();
            let host = route.upstream.authority.host().to_ascii_lowercase();
            by_host.entry(authority.clone()).or_default().push(route.clone());
            if host != authority {
                by_host.entry(host).or_default().push(route.clone());
            }
            table.insert(r.prefix.as_str(), route);
        }
        Ok(Runtime {
            table,
            providers,
            limits: config.limits.clone(),
            access: config.access.clone(),
            tls_allow: config.tls.as_ref().map(|t| t.allow.clone()).unwrap_or_default(),
            forward_allow: config.forward_proxy.as_ref().map(|f| f.allow.clone()).unwrap_or_default(),
            by_host,
        })
    }
}

/// The proxy's shared state.
pub struct Proxy {
    /// The current routes and providers.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Metrics,
    unmatched: RouteMetrics,
}

impl Proxy {
    /// Shared state serving `runtime`.
    pub fn new(runtime: Runtime, metrics: Metrics) -> Self {
        let unmatched = RouteMetrics::new(&metrics, "_unmatched");
        Proxy { runtime: ArcSwap::from_pointee(runtime), metrics, unmatched }
    }

    /// Handles one downstream request. Never fails: every error becomes a response.
    pub async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let started = Instant::now();
        let runtime = self.runtime.load_full();
        let method = method_label(req.method());
        let access_log = tracing::enabled!(target: "tokengate::access", tracing::Level::INFO);
        let path = access_log.then(|| req.uri().path().to_owned());
        let mut notes = Notes::default();
        let matched =
            admit::admit(&req, &conn, &runtime).and_then(|()| match_route(&runtime, req.uri(), conn.forward));
        let (route, result) = match matched {
            Err(e) => (None, Err(e)),
            Ok(route) => {
                let result = match admit::authorize(&req, &conn, &route, &runtime) {
                    Ok(()) => self.forward(&runtime, &route, req, conn, &mut notes).await,
                    Err(e) => Err(e),
                };
                if let Err(
                    e @ (ProxyError::UpstreamUnreachable
                    | ProxyError::UpstreamTimeout
                    | ProxyError::UpstreamFailed),
                ) = &result
                {
                    let kind = e.status_and_code().1;
                    self.metrics.upstream_errors.with_label_values(&[route.label.as_str(), kind]).inc();
                }
                (Some(route), result)
            }
        };
        let label = route.as_ref().map_or("_unmatched", |r| r.label.as_str());
        let denied = match &result {
            Err(ProxyError::Denied(why)) => Some(why.label()),
            Err(ProxyError::MethodNotAllowed { .. }) => Some("method_not_allowed"),
            _ => None,
        };
        if let Some(reason) = denied {
            self.metrics.denied.with_label_values(&[label, reason]).inc();
            tracing::info!(route = label, client = %conn.remote.ip(), reason, "request denied");
        }
        let response = result.unwrap_or_else(ProxyError::into_response);
        let metrics = route.as_ref().map_or(&self.unmatched, |r| &r.metrics);
        self.record(metrics, method, &response, started);
        if let Some(path) = path {
            let bytes = response.body().size_hint().exact();
            tracing::info!(
                target: "tokengate::access",
                client = %conn.remote.ip(),
                route = label,
                method,
                path,
                status = response.status().as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                upstream = route.as_ref().map(|r| r.upstream.to_string()),
                provider = route.as_ref().map(|r| r.provider.name()),
                response_bytes = bytes,
                token_fetched = notes.token_fetched,
                replayed_after_401 = notes.replayed,
            );
        }
        response
    }

    /// Attaches the credential, rewrites the request and forwards it; after a 401, replays it
    /// once with a new token when the body was small enough to keep.
    async fn forward(
        &self,
        runtime: &Runtime,
        route: &Route,
        req: Request<Incoming>,
        conn: Conn,
        notes: &mut Notes,
    ) -> Result<Response<Body>, ProxyError> {
        let limits = &runtime.limits;
        let declared = req.body().size_hint().exact();
        if let (Some(max), Some(len)) = (limits.max_body_size, declared)
            && len > max
        {
            return Err(ProxyError::BodyTooLarge);
        }
        let token = match route.provider.usable() {
            Some(t) => t,
            None => {
                notes.token_fetched = true;
                route
                    .provider
                    .get()
                    .await
                    .map_err(|e| ProxyError::TokenUnavailable { provider: e.provider })?
            }
        };
        let (mut parts, body) = req.into_parts();
        let version = match parts.version {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        if let Some(keys) = &runtime.access.api_keys {
            // The app's key to tokengate is not for the upstream.
            parts.headers.remove(&keys.header);
        }
        let proto = if conn.secure { "https" } else { "http" };
        headers::rewrite_request(&mut parts.headers, conn.remote.ip(), proto, token.header.clone(), version);
        for (name, value) in &route.headers {
            parts.headers.insert(name, value.clone());
        }
        let uri = upstream_uri(route, &parts.uri, conn.forward)?;
        let fault = Arc::new(OnceLock::new());
        let guarded = body::Guarded::new(body, limits.max_body_size, limits.body_read_timeout, fault.clone());
        let template = Template { method: parts.method, uri, headers: parts.headers };
        // Keep small bodies so the request can be replayed after a 401.
        let (kept, first_body) = match declared {
            Some(len) if route.retry_on_401 && len <= limits.replay_buffer => {
                let bytes = guarded.collect().await.map_err(|e| body_error(&fault, &*e))?.to_bytes();
                (Some(bytes.clone()), Body::full(bytes))
            }
            _ => (None, Body::Request(guarded)),
        };
        let resp = self.send(runtime, route, template.build(first_body, None), &fault).await?;
        if resp.status() != StatusCode::UNAUTHORIZED || !route.retry_on_401 {
            return Ok(resp);
        }
        let outcome = match (&kept, route.provider.replace_rejected(token.generation).await) {
            (Some(bytes), Some(fresh)) => {
                self.count_401(route, "replayed");
                notes.replayed = true;
                drop(resp);
                let replay = template.build(Body::full(bytes.clone()), Some(fresh.header.clone()));
                return self.send(runtime, route, replay, &fault).await;
            }
            (None, _) => "not_replayable",
            (Some(_), None) => "no_new_token",
        };
        self.count_401(route, outcome);
        Ok(resp)
    }

    fn count_401(&self, route: &Route, outcome: &str) {
        self.metrics.upstream_401.with_label_values(&[route.label.as_str(), outcome]).inc();
    }

    /// Sends one request upstream within the upstream timeout and maps failures.
    async fn send(
        &self,
        runtime: &Runtime,
        route: &Route,
        req: Request<Body>,
        fault: &OnceLock<body::BodyFault>,
    ) -> Result<Response<Body>, ProxyError> {
        self.metrics.inflight.inc();
        let _inflight = scopeguard(|| self.metrics.inflight.dec());
        let sent = tokio::time::timeout(runtime.limits.upstream_timeout, route.client.request(req)).await;
        let resp = match sent {
            Err(_elapsed) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => {
                if let Some(f) = fault.get() {
                    return Err(fault_error(*f));
                }
                if e.is_connect() {
                    tracing::warn!(route = %route.label, upstream = %route.upstream, error = %e, "upstream unreachable");
                    return Err(ProxyError::UpstreamUnreachable);
                }
                tracing::warn!(route = %route.label, upstream = %route.upstream, error = %e, "upstream request failed");
                return Err(ProxyError::UpstreamFailed);
            }
            Ok(Ok(resp)) => resp,
        };
        let (mut parts, body) = resp.into_parts();
        headers::rewrite_response(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::Incoming(body)))
    }

    fn record(
        &self,
        metrics: &RouteMetrics,
        method: &'static str,
        response: &Response<Body>,
        started: Instant,
    ) {
        let status = response.status();
        let elapsed = started.elapsed();
        metrics.observe(method, status, elapsed.as_secs_f64());
        tracing::debug!(
            route = metrics.route(),
            method,
            status = status.as_u16(),
            elapsed_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}

/// What is needed to build the upstream request again for a replay.
struct Template {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Template {
    fn build(&self, body: Body, authorization: Option<http::HeaderValue>) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        // The upstream connection picks its own version (ALPN); hyper sets Host for HTTP/1.
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        if let Some(auth) = authorization {
            req.headers_mut().insert(http::header::AUTHORIZATION, auth);
        }
        req
    }
}

fn fault_error(fault: body::BodyFault) -> ProxyError {
    match fault {
        body::BodyFault::TooLarge => ProxyError::BodyTooLarge,
        body::BodyFault::Timeout => ProxyError::BodyTimeout,
    }
}

fn body_error(fault: &OnceLock<body::BodyFault>, e: &(dyn std::error::Error + Send + Sync)) -> ProxyError {
    match fault.get() {
        Some(f) => fault_error(*f),
        None => {
            tracing::debug!(error = %e, "downstream request body failed");
            ProxyError::InvalidBody
        }
    }
}

fn match_route(runtime: &Runtime, uri: &Uri, forward: bool) -> Result<Arc<Route>, ProxyError> {
    if forward {
        let authority = uri.authority().map(|a| a.as_str().to_ascii_lowercase()).unwrap_or_default();
        let candidates = runtime.by_host.get(&authority).or_else(|| {
            let host = uri.host().unwrap_or("").to_ascii_lowercase();
            uri.port().is_none().then(|| runtime.by_host.get(&host)).flatten()
        });
        // Several routes may share a host with different base paths: the longest one that
        // prefixes the path wins.
        return candidates
            .and_then(|routes| {
                routes
                    .iter()
                    .filter(|r| {
                        let base = r.upstream.base_path.as_str();
                        base.is_empty() || uri.path() == base || uri.path().starts_with(&format!("{base}/"))
                    })
                    .max_by_key(|r| r.upstream.base_path.len())
            })
            .cloned()
            .ok_or_else(|| ProxyError::NoRoute { path: format!("{authority}{}", uri.path()) });
    }
    runtime
        .table
        .lookup(uri.path())
        .map(|(_, r)| Arc::clone(r))
        .ok_or_else(|| ProxyError::NoRoute { path: uri.path().to_owned() })
}

/// What happened to a request, for the access log.
#[derive(Default)]
struct Notes {
    token_fetched: bool,
    replayed: bool,
}

/// Builds the upstream URI from configured scheme and authority plus the checked path; client
/// input is never parsed as a URL, so it cannot change the host.
fn upstream_uri(route: &Route, uri: &Uri, forward: bool) -> Result<Uri, ProxyError> {
    let mut path = if forward {
        uri.path().to_owned()
    } else {
        route::upstream_path(&route.upstream.base_path, &route.prefix, route.strip_prefix, uri.path())
    };
    if let Some(q) = uri.query() {
        path.push('?');
        path.push_str(q);
    }
    Uri::builder()
        .scheme(route.upstream.scheme.clone())
        .authority(route.upstream.authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| ProxyError::InvalidPath(route::PathError::BadByte))
}

/// A bounded label for the method (clients can send any token as a method).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}
