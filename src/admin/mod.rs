//! The admin listener: `/metrics`, `/healthz`, `/readyz` ([`readiness`]), `/tokens` and
//! `POST /reload`.
//!
//! It is part of the security boundary: `/tokens` and `/readyz` describe the credentials and a
//! reload changes where they are sent. Every request passes [`guard`] first: the client address
//! must be in `admin.allow`, a web browser is refused (`Origin` / `Sec-Fetch-*`: CSRF) except for
//! the status page's own same-origin requests ([`status`]), and `Host` must be an IP literal,
//! `localhost` or a name in `admin.hosts` (DNS rebinding).

pub mod status;

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::config::Admin;
use crate::log::LogLimit;
use crate::proxy::error::json_response;
use crate::proxy::{Body, Conn};
use crate::reload::Control;

/// Answers one admin request.
pub async fn handle<B>(control: &Arc<Control>, req: Request<B>, conn: Conn) -> Response<Body> {
    let proxy = control.proxy();
    let admin = control.admin();
    if let Err((reason, message)) = guard(&admin, &req, &conn) {
        proxy.metrics.denied.with_label_values(&["_admin", reason]).inc();
        static DENIED: LogLimit = LogLimit::new();
        if let Some(suppressed) = DENIED.admit() {
            tracing::info!(client = %conn.remote.ip(), reason = %reason, suppressed, "admin request denied");
        }
        return json_response(
            StatusCode::FORBIDDEN,
            &serde_json::json!({"error": reason, "message": message}),
        );
    }
    if req.method() == Method::POST && req.uri().path() == "/reload" {
        if !admin.reload {
            return json_response(
                StatusCode::FORBIDDEN,
                &serde_json::json!({"error": "reload_disabled", "message": "POST /reload is off; set admin.reload: true, or send SIGHUP"}),
            );
        }
        return match control.reload_file().await {
            Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"reloaded": true})),
            Err(e) => {
                // The reason can quote configuration values and paths: it goes to the log only.
                tracing::error!(error = %e, "reload failed; the previous configuration stays in force");
                json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({"error": "reload_failed", "message": "the configuration was not reloaded; the previous one stays in force (details are in tokengate's log)"}),
                )
            }
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method_not_allowed", "message": "use GET, or POST /reload"}),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = Response::new(Body::full(proxy.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/" => {
            let mut resp = Response::new(Body::full(status::PAGE));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(status::CSP));
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            resp
        }
        "/status.json" => json_response(StatusCode::OK, &status::json(control)),
        "/tokens" => json_response(
            StatusCode::OK,
            &serde_json::json!({ "providers": status::providers(&proxy.runtime.load().providers) }),
        ),
        "/readyz" => {
            let runtime = proxy.runtime.load();
            let providers: serde_json::Map<String, serde_json::Value> = runtime
                .providers
                .iter()
                .map(|(name, p)| (name.clone(), serde_json::to_value(p.status()).unwrap_or_default()))
                .collect();
            let strict = admin.strict_readiness || query_flag(req.uri().query(), "strict");
            let (status, mut body) = control.readiness.answer(providers, strict);
            // Providers of the last reload still without a token, whose routes kept their
            // previous provider: not serving them is not unready, but it must be seen.
            let warming = control.warming();
            if !warming.is_empty() {
                body["warming"] = serde_json::to_value(warming).unwrap_or_default();
            }
            json_response(status, &body)
        }
        other => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found", "path": other, "message": "admin endpoints: / (status page), /status.json, /metrics, /healthz, /readyz, /tokens, POST /reload"}),
        ),
    }
}

/// Whether `query` sets `name` to a true value (`strict`, `strict=1`, `strict=true`).
fn query_flag(query: Option<&str>, name: &str) -> bool {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == name && matches!(v.as_ref(), "" | "1" | "true" | "yes"))
}

/// The admin listener's access rules; the error is a metric reason and a message.
fn guard<B>(admin: &Admin, req: &Request<B>, conn: &Conn) -> Result<(), (&'static str, &'static str)> {
    if !crate::config::allowed(&admin.allow, conn.remote.ip()) {
        return Err(("address_not_allowed", "this client address may not use the admin listener"));
    }
    if crate::proxy::admit::from_browser(req.headers()) && !status_page_request(req) {
        return Err(("browser_request", "requests from web browsers are not accepted"));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host
        && !crate::config::host_served(&admin.hosts, host)
    {
        return Err(("host_not_allowed", "this Host is not served by the admin listener"));
    }
    Ok(())
}

/// A browser may load the status page and make its own requests: `GET /` typed into the address
/// bar (`Sec-Fetch-Site: none`) and the page's same-origin `GET /status.json` and `POST /reload`.
/// Another site's page is refused: its requests say `cross-site` or `same-site`, or carry an
/// `Origin` that is not this listener (browsers without `Sec-Fetch-*` still send `Origin` on
/// POST). Together with the `Host` check, no other page can read or change anything here.
fn status_page_request<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    let site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let path = req.uri().path();
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let same_origin = match h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => host.is_some_and(|host| {
            origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host)
        }),
    };
    let allowed_site = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/") => matches!(site, None | Some("none" | "same-origin")),
        (&Method::GET | &Method::HEAD, "/status.json") | (&Method::POST, "/reload") => {
            matches!(site, None | Some("same-origin"))
        }
        _ => false,
    };
    allowed_site && same_origin
}
