//! Upstreams behind a corporate HTTP proxy: a CONNECT tunnel (RFC 9110 section 9.3.6) for TLS
//! and upgrades, or plain requests in absolute form for `http://` upstreams ([`Path::Forward`]).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ProxyUrl;

/// Longest proxy answer head to a CONNECT.
const MAX_HEAD: usize = 8 * 1024;

/// How a connection reaches its upstream.
#[derive(Clone, Copy)]
pub enum Path<'a> {
    /// Straight to the upstream.
    Direct,
    /// Through a CONNECT tunnel of the proxy.
    Tunnel(&'a ProxyUrl),
    /// To the proxy, which takes absolute-form requests for the upstream.
    Forward(&'a ProxyUrl),
}

/// The proxy refused or failed the tunnel; carried inside an `io::Error` so the connect paths
/// (hyper's too) report it as such.
#[derive(Debug, thiserror::Error)]
#[error("egress proxy {proxy} {why}")]
pub struct Refused {
    proxy: String,
    why: String,
}

impl Refused {
    pub(super) fn io(proxy: &ProxyUrl, why: String) -> std::io::Error {
        std::io::Error::other(Refused { proxy: proxy.to_string(), why })
    }
}

/// The egress proxy's refusal somewhere in `e`'s chain of causes, if that is why it failed.
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(r.to_string());
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<Refused>())
        {
            return Some(r.to_string());
        }
        cur = c.source();
    }
    None
}

/// Opens a TCP connection to `addr` (`host:port`) the way `path` says: for a tunnel, the
/// connection returned carries the upstream's bytes once the proxy agreed.
pub async fn connect(addr: &str, path: Path<'_>) -> std::io::Result<TcpStream> {
    match path {
        Path::Direct => TcpStream::connect(addr).await,
        Path::Forward(proxy) => reach(proxy).await,
        Path::Tunnel(proxy) => tunnel(proxy, addr).await,
    }
}

async fn reach(proxy: &ProxyUrl) -> std::io::Result<TcpStream> {
    TcpStream::connect(proxy.authority.as_str())
        .await
        .map_err(|e| Refused::io(proxy, format!("cannot be reached: {e}")))
}

/// `CONNECT addr`, with the proxy's credentials; the proxy's 2xx opens the tunnel.
async fn tunnel(proxy: &ProxyUrl, addr: &str) -> std::io::Result<TcpStream> {
    let mut tcp = reach(proxy).await?;
    let mut head = format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(auth) = proxy.authorization() {
        head.push_str("Proxy-Authorization: ");
        head.push_str(auth.to_str().unwrap_or_default());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    let status = answer(&mut tcp, proxy).await?;
    match status {
        200..=299 => Ok(tcp),
        // A CONNECT has no origin to authenticate with: a 401 (tinyproxy's answer to wrong
        // credentials) is the proxy's too.
        401 | 407 => Err(Refused::io(
            proxy,
            format!(
                "answered {status} to CONNECT: check the user and password in egress_proxy (or egress_proxy_password_file)"
            ),
        )),
        _ => Err(Refused::io(proxy, format!("refused the tunnel to {addr}: HTTP {status}"))),
    }
}

/// Reads the proxy's answer head to a CONNECT and returns its status. Nothing may follow the
/// head: the upstream speaks only after tokengate has.
async fn answer(tcp: &mut TcpStream, proxy: &ProxyUrl) -> std::io::Result<u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(Refused::io(proxy, "closed the connection instead of answering CONNECT".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) if len == buf.len() => return Ok(resp.code.unwrap_or(0)),
            // A refusal may come with a body; a tunnel may not carry bytes yet.
            Ok(httparse::Status::Complete(_)) if !(200..300).contains(&resp.code.unwrap_or(0)) => {
                return Ok(resp.code.unwrap_or(0));
            }
            Ok(httparse::Status::Complete(_)) => {
                return Err(Refused::io(proxy, "sent data into the tunnel before it was used".into()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => {
                return Err(Refused::io(
                    proxy,
                    "answered CONNECT with something that is not HTTP/1.1".into(),
                ));
            }
        }
    }
}

/// hyper's connector through the egress proxy: every connection is a CONNECT tunnel (TLS then
/// runs inside it). Without a proxy, the inner connector connects directly.
#[derive(Clone)]
pub struct Connector<C> {
    inner: C,
    proxy: Option<std::sync::Arc<ProxyUrl>>,
}

impl<C> Connector<C> {
    /// `inner` for direct connections, `proxy` for the rest.
    pub fn new(inner: C, proxy: Option<ProxyUrl>) -> Self {
        Connector { inner, proxy: proxy.map(std::sync::Arc::new) }
    }
}

impl<C> tower_service::Service<http::Uri> for Connector<C>
where
    C: tower_service::Service<http::Uri, Response = hyper_util::rt::TokioIo<TcpStream>>
        + Clone
        + Send
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<super::BoxError>,
{
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = super::BoxError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, super::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let Some(proxy) = self.proxy.clone() else {
            let fut = self.inner.call(uri);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        Box::pin(async move {
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let addr = format!("{}:{port}", uri.host().unwrap_or_default());
            let tcp = tunnel(&proxy, &addr).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(tcp))
        })
    }
}
