//! The request path. Each request goes through the same short sequence of steps:
//! admit → match route → attach credential → rewrite → forward → map errors → record.

pub mod admit;
pub mod body;
pub mod error;
pub mod headers;
mod inflight;
pub mod websocket;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub use admit::{Conn, Denied};
pub use error::ProxyError;

use crate::config::{Config, Limits, Upstream};
use crate::log::LogLimit;
use crate::metrics::{Metrics, RouteMetrics};
use crate::route::{self, RouteTable};
use crate::token::{Providers, TokenSource};

use crate::upstream::{self, Payload, h1};
pub use crate::upstream::{Body, BoxError};

/// A route ready to serve.
pub struct Route {
    /// Metrics and log label.
    pub label: String,
    /// The normalised prefix.
    pub prefix: String,
    /// Where requests go.
    pub upstream: Upstream,
    /// The upstream URL as the access log writes it, formatted once.
    pub upstream_text: String,
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
    // The route's log lines that requests cause, each kind limited on its own.
    logs: RouteLogs,
    // How requests reach the upstream.
    client: upstream::Client,
    // Where the credential goes.
    inject: crate::config::Inject,
    // WebSocket upgrades are forwarded, with tunnels closed at this lifetime.
    websocket: Option<Option<crate::config::TunnelLifetime>>,
    // The callers it serves (empty: all).
    callers: Vec<String>,
    // The same route with another provider, by caller.
    variants: std::collections::HashMap<String, Arc<Route>>,
}

/// Rate limits for the log lines a route's requests cause ([`crate::log::LogLimit`]).
#[derive(Default)]
struct RouteLogs {
    denied: LogLimit,
    busy: LogLimit,
    unreachable: LogLimit,
    failed: LogLimit,
}

/// What a configuration turns into: the route table and its token sources. Swapped whole on
/// reload, so a request sees one consistent version from start to end.
pub struct Runtime {
    /// Routes by prefix.
    pub table: RouteTable<Arc<Route>>,
    /// The same routes in configuration order.
    pub routes: Vec<Arc<Route>>,
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
    /// Routes by upstream authority (`host:port` and bare `host`), then by base path, for the
    /// forward proxy.
    pub by_host: std::collections::HashMap<String, RouteTable<Arc<Route>>>,
    /// Who is calling, when the configuration names callers.
    pub callers: Option<Arc<crate::caller::Identify>>,
}

impl Runtime {
    /// Builds routes for `config` on top of already-built token sources.
    pub fn build(config: &Config, providers: Providers, metrics: &Metrics) -> Result<Self, String> {
        let mut clients = upstream::Clients::new(&config.limits);
        let mut table = RouteTable::default();
        let mut routes = Vec::new();
        let mut by_host: std::collections::HashMap<String, RouteTable<Arc<Route>>> =
            std::collections::HashMap::new();
        for r in &config.routes {
            let provider = |name: &str| {
                providers
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("route {}: unknown provider {name}", r.label()))
            };
            let identity = r.client_identity();
            let reach = upstream::Reach {
                upstream: &r.upstream,
                ca_file: r.ca_file.as_ref(),
                identity: identity.as_ref(),
                protocol: r.upstream_protocol,
                egress: r.egress.as_ref(),
                server_name: r.server_name.as_ref().map(|t| t.0.as_str()),
            };
            let client = clients.client(&reach).map_err(|e| format!("route {}: {e}", r.label()))?;
            let mut route = Route::new(config, r, provider(&r.provider.0)?, client.clone(), metrics);
            // The same route with another provider, for the callers that have one.
            for (caller, name) in &r.provider_by_caller {
                let variant = Route::new(config, r, provider(&name.0)?, client.clone(), metrics);
                route.variants.insert(caller.clone(), Arc::new(variant));
            }
            let route = Arc::new(route);
            let authority = route.upstream.authority.as_str().to_ascii_lowercase();
            let host = route.upstream.authority.host().to_ascii_lowercase();
            // The forward proxy routes by upstream and then by the upstream's base path.
            let base = match route.upstream.base_path.as_str() {
                "" => "/",
                base => base,
            };
            by_host.entry(authority.clone()).or_default().insert(base, route.clone());
            if host != authority {
                by_host.entry(host).or_default().insert(base, route.clone());
            }
            routes.push(route.clone());
            table.insert(r.prefix.as_str(), route);
        }
        let callers = (!config.callers.is_empty())
            .then(|| {
                let header = config.access.api_keys.as_ref().map_or(API_KEY_HEADER, |k| k.header.clone());
                crate::caller::Identify::new(&config.callers, header).map(Arc::new)
            })
            .transpose()?;
        Ok(Runtime {
            table,
            routes,
            providers,
            callers,
            limits: config.limits.clone(),
            access: config.access.clone(),
            tls_allow: config.tls.as_ref().map(|t| t.allow.clone()).unwrap_or_default(),
            forward_allow: config.forward_proxy.as_ref().map(|f| f.allow.clone()).unwrap_or_default(),
            by_host,
        })
    }
}

/// Where callers send API keys when `access.api_keys` does not say.
const API_KEY_HEADER: http::HeaderName = http::HeaderName::from_static("x-api-key");

impl Route {
    /// The route `r` with `provider`'s tokens, reaching its upstream by `client`.
    fn new(
        config: &Config,
        r: &crate::config::RouteConfig,
        provider: Arc<TokenSource>,
        client: upstream::Client,
        metrics: &Metrics,
    ) -> Self {
        Route {
            label: r.label().to_owned(),
            prefix: r.prefix.as_str().to_owned(),
            upstream: r.upstream.clone(),
            upstream_text: r.upstream.to_string(),
            strip_prefix: r.strip_prefix,
            provider,
            headers: r.headers.clone(),
            retry_on_401: r.retry_on_401,
            metrics: RouteMetrics::new(metrics, r.label()),
            allow: r.allow.clone(),
            methods: r.methods.clone(),
            require_api_key: r.require_api_key.unwrap_or(config.access.api_keys.is_some()),
            require_client_cert: r.require_client_cert,
            logs: RouteLogs::default(),
            client,
            inject: r.inject.clone().unwrap_or_default(),
            websocket: r.websocket().then_some(r.websocket_max_lifetime),
            callers: r.callers.iter().map(|c| c.0.clone()).collect(),
            variants: std::collections::HashMap::new(),
        }
    }
}

/// The proxy's shared state.
pub struct Proxy {
    /// The current routes and providers.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Metrics,
    unmatched: RouteMetrics,
    unmatched_denied: LogLimit,
    in_flight: inflight::InFlight,
    access_log: crate::access_log::AccessLog,
    traces: Option<Arc<crate::trace::Traces>>,
}

impl Proxy {
    /// Shared state serving `runtime`, writing one line per request to `access_log`.
    pub fn new(runtime: Runtime, metrics: Metrics, access_log: crate::access_log::AccessLog) -> Self {
        let unmatched = RouteMetrics::new(&metrics, "_unmatched");
        Proxy {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            unmatched,
            unmatched_denied: LogLimit::default(),
            in_flight: inflight::InFlight::new(),
            access_log,
            traces: None,
        }
    }

    /// Traces requests with `traces` (`tracing:` in the configuration).
    pub fn with_traces(self, traces: Option<Arc<crate::trace::Traces>>) -> Self {
        Proxy { traces, ..self }
    }

    /// The tracer, when requests are traced.
    pub fn traces(&self) -> Option<&Arc<crate::trace::Traces>> {
        self.traces.as_ref()
    }

    /// The access log.
    pub fn access_log(&self) -> &crate::access_log::AccessLog {
        &self.access_log
    }

    /// Handles one downstream request. Never fails: every error becomes a response.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        tunnels: &websocket::ConnTunnels,
    ) -> Response<Body> {
        let started = Instant::now();
        let runtime = self.runtime.load_full();
        let method = method_label(req.method());
        let mut notes = Notes::default();
        // Kept when the client (or a proxy in front) sent a well-formed one, else made here; the
        // upstream, the response and the access log carry it.
        let request_id = headers::request_id(req.headers());
        req.headers_mut().insert(headers::X_REQUEST_ID, request_id.clone());
        notes.trace =
            self.traces.as_ref().and_then(|t| t.request(req.headers(), req.method(), req.uri().path()));
        // An HTTP/1 body that is answered before it is read leaves the connection unusable: hyper
        // closes it, and a client reusing it would meet a closed socket on its next request.
        let unread_body = req.version() < http::Version::HTTP_2 && !req.body().is_end_stream();
        let place = self.in_flight.enter(runtime.limits.max_requests_in_flight);
        let matched = match place {
            None => Err(ProxyError::Overloaded),
            Some(_) => admit::admit(&mut req, &conn, &runtime)
                .and_then(|ask| Ok((match_route(&runtime, req.uri(), conn.forward)?, ask))),
        };
        // The path as routed (normal form) is known after admission; copies are made only for
        // the access log.
        let logged = self.access_log.enabled().then(|| Logged::of(&req));
        let (route, result) = match matched {
            Err(e) => (None, Err(e)),
            Ok((route, ask)) => {
                let (route, result) =
                    self.dispatch(&runtime, route, req, ask, &conn, tunnels, &mut notes).await;
                if let Err(
                    e @ (ProxyError::UpstreamUnreachable
                    | ProxyError::EgressProxy
                    | ProxyError::UpstreamCertificate(_)
                    | ProxyError::UpstreamTimeout
                    | ProxyError::UpstreamFailed
                    | ProxyError::UpstreamBusy),
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
            let limit = route.as_ref().map_or(&self.unmatched_denied, |r| &r.logs.denied);
            if let Some(suppressed) = limit.admit() {
                tracing::info!(route = %label, client = %conn.remote.ip(), reason = %reason, suppressed, "request denied");
            }
        }
        let body_refused = unread_body
            && match &result {
                Err(ProxyError::BodyTooLarge | ProxyError::BodyTimeout | ProxyError::InvalidBody) => true,
                Err(_) => !notes.body_read,
                Ok(_) => false,
            };
        let error = result.as_ref().err().map(|e| e.status_and_code().1);
        let mut response = result.unwrap_or_else(ProxyError::into_response);
        if body_refused {
            // Said so the client opens a new connection for its next request.
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        response.headers_mut().insert(headers::X_REQUEST_ID, request_id.clone());
        let metrics = route.as_ref().map_or(&self.unmatched, |r| &r.metrics);
        self.record(metrics, method, &response, started);
        if runtime.callers.is_some() {
            let caller = notes.caller.as_deref().unwrap_or("_unknown");
            let status = response.status();
            self.metrics.caller_requests.with_label_values(&[label, caller, status.as_str()]).inc();
        }
        if let Some(logged) = &logged {
            self.access_log.record(&crate::access_log::Record {
                request_id: request_id.to_str().unwrap_or("-"),
                client: conn.remote.ip(),
                method: logged.method.as_str(),
                path: &logged.path,
                protocol: logged.protocol,
                user_agent: logged.user_agent.as_deref(),
                bytes_in: logged.bytes_in,
                upstream_duration: notes.upstream_duration,
                status: response.status().as_u16(),
                bytes: response.body().size_hint().exact(),
                duration: started.elapsed(),
                route: label,
                upstream: route.as_ref().map(|r| r.upstream_text.as_str()),
                provider: route.as_ref().map(|r| r.provider.name()),
                caller: notes.caller.as_deref(),
                error,
                host: logged.host.as_deref(),
                token_fetched: notes.token_fetched,
                replayed: notes.replayed,
            });
        }
        if let Some(trace) = notes.trace.take() {
            trace.finish(&crate::trace::Outcome {
                route: label,
                caller: notes.caller.as_deref(),
                status: response.status().as_u16(),
                upstream: route.as_ref().map(|r| r.upstream_text.as_str()),
                provider: route.as_ref().map(|r| r.provider.name()),
                error,
            });
        }
        response
    }

    /// A matched request: the route's access rules, the caller (whose route variant serves it),
    /// then forwarding as a plain request or a WebSocket.
    #[allow(clippy::too_many_arguments)]
    async fn dispatch(
        &self,
        runtime: &Runtime,
        route: Arc<Route>,
        req: Request<Incoming>,
        ask: Option<websocket::Ask>,
        conn: &Conn,
        tunnels: &websocket::ConnTunnels,
        notes: &mut Notes,
    ) -> (Arc<Route>, Result<Response<Body>, ProxyError>) {
        if let Err(e) = admit::authorize(&req, conn, &route, runtime) {
            return (route, Err(e));
        }
        let route = match self.caller(runtime, route, &req, conn, notes).await {
            Ok(route) => route,
            Err((route, e)) => return (route, Err(e)),
        };
        let result = match ask {
            None => self.forward(runtime, &route, req, conn, notes).await,
            Some(_) if route.websocket.is_none() => Err(ProxyError::UpgradeNotSupported(
                "this route does not forward WebSocket; it needs websocket: true",
            )),
            // Boxed, as the other rare paths below: every request's future is as large as the
            // largest thing it may await, and hyper moves it into place once per request.
            Some(ask) => {
                Box::pin(self.forward_websocket(runtime, &route, req, ask, conn, tunnels, notes)).await
            }
        };
        (route, result)
    }

    /// Who is calling, when callers are configured: a request from none of them is refused, one
    /// the route does not serve too, and a caller with its own provider gets the route's
    /// variant with it.
    async fn caller(
        &self,
        runtime: &Runtime,
        route: Arc<Route>,
        req: &Request<Incoming>,
        conn: &Conn,
        notes: &mut Notes,
    ) -> Result<Arc<Route>, (Arc<Route>, ProxyError)> {
        let Some(identify) = &runtime.callers else { return Ok(route) };
        let found = match identify.identify(req.headers(), conn.remote.ip(), conn.peer.as_deref()).await {
            Ok(Some(found)) => found,
            Ok(None) => return Err((route, ProxyError::CallerUnknown)),
            Err(crate::caller::Rejected::Invalid(why)) => return Err((route, ProxyError::InvalidToken(why))),
            Err(crate::caller::Rejected::KeysUnavailable(why)) => {
                tracing::warn!(error = %why, "a caller's JWT cannot be checked: the issuer's keys are unavailable");
                return Err((route, ProxyError::CallerKeysUnavailable));
            }
        };
        let name = found.name;
        notes.caller = Some(name.to_owned());
        notes.subject = found.subject;
        if !route.callers.is_empty() && !route.callers.iter().any(|c| c == name) {
            return Err((route, ProxyError::Denied(Denied::Caller)));
        }
        Ok(route.variants.get(name).cloned().unwrap_or(route))
    }

    /// Attaches the credential, rewrites the request and forwards it; after a 401, replays it
    /// once with a new token when the body was small enough to keep.
    async fn forward(
        &self,
        runtime: &Runtime,
        route: &Route,
        req: Request<Incoming>,
        conn: &Conn,
        notes: &mut Notes,
    ) -> Result<Response<Body>, ProxyError> {
        let limits = &runtime.limits;
        let declared = req.body().size_hint().exact();
        if let (Some(max), Some(len)) = (limits.max_body_size, declared)
            && len > max
        {
            return Err(ProxyError::BodyTooLarge);
        }
        let (parts, body) = req.into_parts();
        let (mut request, token) = self.outgoing(runtime, route, parts, conn, notes).await?;
        let fault = Arc::new(OnceLock::new());
        notes.body_read = true;
        let pace = body::Pace { pause: limits.body_read_timeout, min_rate: limits.body_min_rate };
        let guarded = body::Guarded::new(body, limits.max_body_size, pace, fault.clone());
        // Small bodies are read first, whatever their framing: they can be replayed after a 401,
        // and the lean client sends them with the head in one write. A chunked body is read up
        // to the replay buffer; past it, what was read goes first and the rest streams.
        let payload = match declared {
            Some(0) => Payload::Buffered(Bytes::new()),
            Some(len) if len <= limits.replay_buffer => {
                let bytes = guarded.collect().await.map_err(|e| body_error(&fault, &*e))?.to_bytes();
                Payload::Buffered(bytes)
            }
            Some(_) => Payload::Streamed(Body::Streaming(Box::pin(guarded))),
            None => {
                let mut guarded = guarded;
                match guarded.read_up_to(limits.replay_buffer).await.map_err(|e| body_error(&fault, &*e))? {
                    Some(bytes) => Payload::Buffered(bytes),
                    None => Payload::Streamed(Body::Streaming(Box::pin(guarded))),
                }
            }
        };
        let kept = match &payload {
            Payload::Buffered(bytes) => Some(bytes.clone()),
            Payload::Streamed(_) => None,
        };
        let exchange = notes.trace.as_ref().map(|t| t.upstream(&mut request.headers, &route.upstream_text));
        let sent = Instant::now();
        let resp = self.send(runtime, route, &request, payload, &fault).await;
        notes.upstream_duration = Some(sent.elapsed());
        traced(exchange, &resp);
        let resp = resp?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            accepted(route, &token, resp.status());
            return Ok(resp);
        }
        if !route.retry_on_401 {
            return Ok(resp);
        }
        let outcome = match (kept, Box::pin(replacement(route, &token, notes)).await) {
            (Some(bytes), Some(fresh)) => {
                self.count_401(route, "replayed");
                notes.replayed = true;
                drop(resp);
                attach(&route.inject, &mut request, &fresh);
                let exchange =
                    notes.trace.as_ref().map(|t| t.upstream(&mut request.headers, &route.upstream_text));
                let sent = Instant::now();
                let resp = self.send(runtime, route, &request, Payload::Buffered(bytes), &fault).await;
                notes.upstream_duration = Some(sent.elapsed());
                traced(exchange, &resp);
                let resp = resp?;
                accepted(route, &fresh, resp.status());
                return Ok(resp);
            }
            (None, _) => "not_replayable",
            (Some(_), None) => "no_new_token",
        };
        self.count_401(route, outcome);
        Ok(resp)
    }

    /// The token for `route` and the upstream request head for `parts`: headers rewritten for
    /// the upstream, the route's headers set and the credential attached.
    async fn outgoing(
        &self,
        runtime: &Runtime,
        route: &Route,
        mut parts: http::request::Parts,
        conn: &Conn,
        notes: &mut Notes,
    ) -> Result<(Outgoing, Arc<crate::token::Token>), ProxyError> {
        let token = match route.provider.usable() {
            Some(t) => t,
            None if route.provider.per_subject() => {
                let subject = notes.subject.as_ref().ok_or(ProxyError::CallerTokenNeeded)?;
                notes.token_fetched = true;
                let exchange = route.provider.for_subject(&subject.key, &subject.token);
                let name = route.provider.name();
                Box::pin(crate::trace::fetching(notes.trace.as_ref(), name, exchange, Result::is_ok)).await.map_err(|e| {
                    tracing::warn!(provider = %e.provider, error = %e.reason, "exchanging the caller's token failed");
                    ProxyError::TokenUnavailable { provider: e.provider, retry_in: e.retry_in }
                })?
            }
            None => {
                notes.token_fetched = true;
                let wait = route.provider.get_within(runtime.limits.token_wait);
                let name = route.provider.name();
                // Boxed: a request waits for a token only when none is usable.
                Box::pin(crate::trace::fetching(notes.trace.as_ref(), name, wait, Result::is_ok))
                    .await
                    .map_err(|e| ProxyError::TokenUnavailable {
                        provider: e.provider,
                        retry_in: e.retry_in,
                    })?
            }
        };
        let version = match parts.version {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        if let Some(keys) = &runtime.access.api_keys {
            // The app's key to tokengate is not for the upstream.
            parts.headers.remove(&keys.header);
        }
        if runtime.callers.is_some() {
            parts.headers.remove(API_KEY_HEADER);
        }
        let hop = headers::Forwarding {
            client: conn.remote.ip(),
            trusted: !runtime.access.trusted_proxies.is_empty()
                && crate::config::allowed(&runtime.access.trusted_proxies, conn.remote.ip()),
            proto: if conn.secure { "https" } else { "http" },
            authority: parts.uri.authority(),
            format: runtime.access.forwarded,
            version,
        };
        let default_inject = route.inject.is_default();
        let in_authorization = default_inject.then(|| token.header.clone());
        headers::rewrite_request(&mut parts.headers, &hop, in_authorization);
        for (name, value) in &route.headers {
            parts.headers.insert(name, value.clone());
        }
        let target = upstream_target(route, &parts.uri, conn.forward);
        let mut request = Outgoing { method: parts.method, target, headers: parts.headers };
        if !default_inject {
            attach(&route.inject, &mut request, &token);
        }
        Ok((request, token))
    }

    fn count_401(&self, route: &Route, outcome: &str) {
        self.metrics.upstream_401.with_label_values(&[route.label.as_str(), outcome]).inc();
    }

    /// Sends one request upstream within the upstream timeout and maps failures.
    async fn send(
        &self,
        runtime: &Runtime,
        route: &Route,
        request: &Outgoing,
        payload: upstream::Payload,
        fault: &OnceLock<body::BodyFault>,
    ) -> Result<Response<Body>, ProxyError> {
        self.metrics.inflight.inc();
        let _inflight = scopeguard(|| self.metrics.inflight.dec());
        let head = h1::Head { method: &request.method, target: &request.target, headers: &request.headers };
        let sent = route.client.send(&head, payload, runtime.limits.upstream_timeout).await;
        sent.map_err(|e| match fault.get() {
            // The upstream request failed because the client's body did.
            Some(f) => fault_error(*f),
            None => self.upstream_error(route, &e),
        })
    }

    /// The one place upstream failures become answers (and rate-limited log lines).
    fn upstream_error(&self, route: &Route, e: &upstream::Error) -> ProxyError {
        let (limit, error, message) = match e {
            upstream::Error::Timeout(_) => return ProxyError::UpstreamTimeout,
            upstream::Error::Busy(_) => {
                (&route.logs.busy, ProxyError::UpstreamBusy, "upstream connection limit reached")
            }
            upstream::Error::Unreachable(_) => {
                (&route.logs.unreachable, ProxyError::UpstreamUnreachable, "upstream unreachable")
            }
            upstream::Error::Failed(_) => {
                (&route.logs.failed, ProxyError::UpstreamFailed, "upstream request failed")
            }
            upstream::Error::Proxy(_) => (
                &route.logs.unreachable,
                ProxyError::EgressProxy,
                "the egress proxy failed the upstream connection",
            ),
            upstream::Error::Certificate(why) => (
                &route.logs.unreachable,
                ProxyError::UpstreamCertificate(why.clone()),
                "the upstream's TLS certificate was refused",
            ),
        };
        if let Some(suppressed) = limit.admit() {
            tracing::warn!(route = %route.label, upstream = %route.upstream, error = %e, suppressed, "{message}");
        }
        error
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

/// The upstream request without its body, kept to be sent again after a 401.
struct Outgoing {
    method: Method,
    /// Path and query.
    target: String,
    headers: http::HeaderMap,
}

/// Puts the credential where `inject` says, replacing what the request carried there.
fn attach(inject: &crate::config::Inject, request: &mut Outgoing, token: &crate::token::Token) {
    use crate::config::Inject;
    match inject {
        Inject::Header { name, .. } if inject.is_default() => {
            request.headers.insert(name, token.header.clone());
        }
        Inject::Header { name, .. } => {
            let mut value = http::HeaderValue::from_str(&inject.value(token.value.expose()))
                .unwrap_or_else(|_| http::HeaderValue::from_static(""));
            value.set_sensitive(true);
            request.headers.insert(name, value);
        }
        Inject::Query { param, .. } => {
            request.target = with_query_param(&request.target, param, &inject.value(token.value.expose()));
        }
    }
}

/// Everything but the unreserved characters of RFC 3986 is percent-encoded in a query value.
const QUERY_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `target` with every `param` of its query (however the client spelled the name) replaced by
/// one `param=value`, the value percent-encoded (a space as `%20`, as Corti's streams expect).
fn with_query_param(target: &str, param: &str, value: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = String::with_capacity(target.len() + param.len() + value.len() * 3 + 2);
    out.push_str(path);
    out.push('?');
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or(pair);
        let decoded: String = form_urlencoded::parse(name.as_bytes()).map(|(k, _)| k.into_owned()).collect();
        if decoded != param {
            out.push_str(pair);
            out.push('&');
        }
    }
    out.push_str(param);
    out.push('=');
    out.extend(percent_encoding::utf8_percent_encode(value, QUERY_VALUE));
    out
}

/// An answer other than 401 (and not a server error, which says nothing about the credential)
/// shows the upstream accepted the token.
/// A new token after the upstream refused `rejected`: the caller's own exchanged one when the
/// provider exchanges per caller.
async fn replacement(
    route: &Route,
    rejected: &crate::token::Token,
    notes: &Notes,
) -> Option<Arc<crate::token::Token>> {
    let fresh = async {
        match &notes.subject {
            Some(subject) if route.provider.per_subject() => {
                route.provider.forget_subject(&subject.key);
                route.provider.for_subject(&subject.key, &subject.token).await.ok()
            }
            _ => route.provider.replace_rejected(rejected).await,
        }
    };
    crate::trace::fetching(notes.trace.as_ref(), route.provider.name(), fresh, Option::is_some).await
}

fn accepted(route: &Route, token: &crate::token::Token, status: StatusCode) {
    if status != StatusCode::UNAUTHORIZED && !status.is_server_error() {
        route.provider.confirm(token);
    }
}

fn fault_error(fault: body::BodyFault) -> ProxyError {
    match fault {
        body::BodyFault::TooLarge => ProxyError::BodyTooLarge,
        body::BodyFault::Timeout => ProxyError::BodyTimeout,
        body::BodyFault::Malformed => ProxyError::InvalidBody,
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

/// The route for a request, on either listener. Both choose with [`RouteTable::route`], so every
/// rule about paths (whole segments, `;` parameters that would change the route) holds for both:
/// the reverse listener looks up the path among route prefixes, the forward-proxy listener among
/// the base paths of the routes to the named upstream.
fn match_route(runtime: &Runtime, uri: &Uri, forward: bool) -> Result<Arc<Route>, ProxyError> {
    let table = if forward {
        let authority = uri.authority().map(|a| a.as_str().to_ascii_lowercase()).unwrap_or_default();
        runtime.by_host.get(&authority).or_else(|| {
            let host = uri.host().unwrap_or("").to_ascii_lowercase();
            uri.port().is_none().then(|| runtime.by_host.get(&host)).flatten()
        })
    } else {
        Some(&runtime.table)
    };
    let found = match table {
        Some(table) => table.route(uri.path()).map_err(ProxyError::InvalidPath)?,
        None => None,
    };
    found.map(|(_, r)| Arc::clone(r)).ok_or_else(|| {
        let authority = if forward { uri.authority().map_or("", |a| a.as_str()) } else { "" };
        ProxyError::NoRoute { path: format!("{authority}{}", uri.path()) }
    })
}

/// What happened to a request, for the access log.
#[derive(Default)]
struct Notes {
    // The caller, when callers are configured and one was identified.
    caller: Option<String>,
    // Who the caller's validated JWT is for, to exchange on its behalf.
    subject: Option<crate::caller::Subject>,
    token_fetched: bool,
    replayed: bool,
    // The request body was read (or its reading started).
    body_read: bool,
    // Until the (last) upstream response head.
    upstream_duration: Option<Duration>,
    // The request's span, when it is traced.
    trace: Option<crate::trace::Traced>,
}

/// Ends an upstream exchange's span, if it has one, with what came back.
fn traced(exchange: Option<crate::trace::Child>, response: &Result<Response<Body>, ProxyError>) {
    match (exchange, response) {
        (Some(span), Ok(r)) => span.responded(r.status().as_u16()),
        (Some(span), Err(_)) => span.done(false),
        (None, _) => {}
    }
}

/// What the access log keeps of a request before it is forwarded.
struct Logged {
    method: http::Method,
    path: String,
    protocol: &'static str,
    user_agent: Option<String>,
    bytes_in: Option<u64>,
    host: Option<String>,
}

/// `bytes` as text (lossy), cut to at most `max` bytes on a character boundary.
fn cut(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl Logged {
    fn of<B>(req: &Request<B>) -> Self {
        let protocol = match req.version() {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        };
        let max = crate::access_log::USER_AGENT_MAX;
        let user_agent = req.headers().get(http::header::USER_AGENT).map(|v| cut(v.as_bytes(), max));
        let bytes_in = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let host = req
            .headers()
            .get(http::header::HOST)
            .map(|v| cut(v.as_bytes(), max))
            .or_else(|| req.uri().authority().map(|a| cut(a.as_str().as_bytes(), max)));
        Logged {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            protocol,
            user_agent,
            bytes_in,
            host,
        }
    }
}

/// The upstream path and query: the configured base path plus the checked request path. Client
/// input never becomes a URL of its own, so it cannot change the host.
fn upstream_target(route: &Route, uri: &Uri, forward: bool) -> String {
    let mut target = if forward {
        uri.path().to_owned()
    } else {
        route::upstream_path(&route.upstream.base_path, &route.prefix, route.strip_prefix, uri.path())
    };
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    target
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
