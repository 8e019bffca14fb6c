//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/tokens` and `POST /reload`.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::proxy::Body;
use crate::proxy::error::json_response;
use crate::server::Control;

/// Answers one admin request.
pub async fn handle<B>(control: &Arc<Control>, req: Request<B>) -> Response<Body> {
    let proxy = control.proxy();
    if req.method() == Method::POST && req.uri().path() == "/reload" {
        return match control.reload_file().await {
            Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"reloaded": true})),
            Err(e) => {
                tracing::error!(error = %e, "reload failed; the previous configuration stays in force");
                json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({"error": "reload_failed", "message": e}),
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
        "/tokens" => {
            let runtime = proxy.runtime.load();
            let providers: serde_json::Map<String, serde_json::Value> = runtime
                .providers
                .iter()
                .map(|(name, p)| {
                    let mut v = serde_json::to_value(p.status()).unwrap_or_default();
                    v["type"] = match p.config() {
                        crate::config::Provider::OAuth2(_) => "oauth2",
                        crate::config::Provider::Http(_) => "http",
                    }
                    .into();
                    (name.clone(), v)
                })
                .collect();
            json_response(StatusCode::OK, &serde_json::json!({ "providers": providers }))
        }
        "/readyz" => {
            let runtime = proxy.runtime.load();
            let providers: serde_json::Map<String, serde_json::Value> = runtime
                .providers
                .iter()
                .map(|(name, p)| (name.clone(), serde_json::to_value(p.status()).unwrap_or_default()))
                .collect();
            let ready = providers.values().all(|s| s["ready"] == true);
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json_response(status, &serde_json::json!({"ready": ready, "providers": providers}))
        }
        other => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found", "path": other, "message": "admin endpoints: /metrics, /healthz, /readyz, /tokens, POST /reload"}),
        ),
    }
}
