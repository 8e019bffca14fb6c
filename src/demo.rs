//! `tokengate demo`: a built-in OAuth2 token endpoint and echo upstream on loopback, so the
//! proxy can be tried with nothing but curl.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Client credentials the demo token endpoint accepts.
pub const CLIENT_ID: &str = "demo-client";
/// The demo client secret.
pub const CLIENT_SECRET: &str = "demo-secret";
/// Lifetime of demo tokens: short, so refreshes show up in the log and metrics.
pub const TOKEN_LIFETIME_SECS: u64 = 30;

/// Serves `handler` on `addr` (port 0 for any) until the runtime stops; returns the bound address.
pub async fn serve_fn<F, Fut>(addr: SocketAddr, handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// An OAuth2 client_credentials token endpoint (`POST /token`, Basic client auth) that issues
/// numbered opaque tokens valid for [`TOKEN_LIFETIME_SECS`].
pub async fn token_endpoint(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let issued = Arc::new(AtomicU64::new(0));
    let expected = crate::token::oauth2::basic_auth(CLIENT_ID, CLIENT_SECRET, false);
    serve_fn(addr, move |req: Request<Incoming>| {
        let issued = issued.clone();
        let expected = expected.clone();
        async move {
            let auth_ok = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == expected.as_bytes());
            let is_post = req.method() == http::Method::POST && req.uri().path() == "/token";
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let grant_ok =
                form_urlencoded::parse(&body).any(|(k, v)| k == "grant_type" && v == "client_credentials");
            if !is_post {
                return json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "not_found"}));
            }
            if !auth_ok {
                return json(StatusCode::UNAUTHORIZED, &serde_json::json!({"error": "invalid_client"}));
            }
            if !grant_ok {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "unsupported_grant_type"}),
                );
            }
            let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "access_token": format!("demo-token-{n}-{:08x}", rand::random::<u32>()),
                    "token_type": "Bearer",
                    "expires_in": TOKEN_LIFETIME_SECS,
                }),
            )
        }
    })
    .await
}

/// An upstream that answers every request with JSON describing what it received.
pub async fn echo_upstream(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    serve_fn(addr, |req: Request<Incoming>| async move {
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned().into()))
            .collect();
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        json(
            StatusCode::OK,
            &serde_json::json!({
                "method": method,
                "path": path,
                "query": query,
                "headers": headers,
                "body_bytes": body.len(),
            }),
        )
    })
    .await
}

/// The demo configuration, pointing at the built-in servers.
pub fn config_text(idp: SocketAddr, echo: SocketAddr, listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "\
listen: {listen}
admin:
  listen: {admin}
providers:
  demo:
    type: oauth2
    token_url: http://{idp}/token
    client_id: {CLIENT_ID}
    client_secret: {CLIENT_SECRET}
routes:
  - prefix: /echo/
    upstream: http://{echo}
    provider: demo
"
    )
}
