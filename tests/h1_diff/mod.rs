//! Differential harness: one response, byte for byte, read by tokengate's lean HTTP/1.1 client
//! and by hyper's client; the verdicts must agree. Shared by `tests/h1_differential.rs` and the
//! `h1_response` fuzz target.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a client made of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The head was refused.
    Refused,
    /// A response: status, end-to-end headers, the body (or `None` when reading it failed) and
    /// whether the connection may carry another request.
    Response { status: u16, headers: BTreeMap<String, Vec<Vec<u8>>>, body: Option<Vec<u8>>, reusable: bool },
}

/// How long the upstream keeps the connection open after the response: long enough that a
/// reusable connection is seen as reusable, short enough for a close-delimited body to end.
const HOLD: Duration = Duration::from_millis(150);

/// An upstream that answers `GET /case/N` with case N's bytes, byte for byte, then holds the
/// connection open for [`HOLD`] and closes it. One listener serves every case, so thousands of
/// cases do not use up the machine's ports.
pub struct Server {
    addr: SocketAddr,
    cases: Arc<std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Server {
    /// Starts the listener on the current runtime.
    pub async fn start() -> Arc<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cases: Arc<std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>> = Arc::default();
        let c = cases.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let cases = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&got);
                    let id = line
                        .split(' ')
                        .nth(1)
                        .and_then(|p| p.strip_prefix("/case/"))
                        .and_then(|n| n.parse().ok());
                    let Some(bytes) = id.and_then(|id| cases.lock().unwrap().remove(&id)) else { return };
                    let _ = s.write_all(&bytes).await;
                    tokio::time::sleep(HOLD).await;
                    // When the client has closed already (it usually has), close with a reset:
                    // it then keeps no TIME_WAIT socket, and thousands of cases leave the port
                    // range free. (A zero linger never blocks, which is what the deprecation is about.)
                    if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
                    {
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                    }
                });
            }
        });
        Arc::new(Server { addr, cases, next: std::sync::atomic::AtomicU64::new(0) })
    }

    fn add(&self, bytes: Vec<u8>) -> String {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.cases.lock().unwrap().insert(id, bytes);
        format!("/case/{id}")
    }

    /// Both verdicts for `bytes`.
    pub async fn both(&self, bytes: Vec<u8>) -> (Verdict, Verdict) {
        let (a, b) = (self.add(bytes.clone()), self.add(bytes));
        tokio::join!(lean(self.addr, &a), hyper(self.addr, &b))
    }
}

/// Headers both clients keep: hop-by-hop ones (and `Content-Length`, which each re-frames) are
/// the proxy's business, not part of the verdict.
fn end_to_end(headers: &http::HeaderMap) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut listed: Vec<String> = Vec::new();
    for v in headers.get_all(http::header::CONNECTION) {
        listed.extend(v.to_str().unwrap_or("").split(',').map(|t| t.trim().to_ascii_lowercase()));
    }
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if tokengate::upstream::hop::is_hop_by_hop(name)
            || n == "content-length"
            || listed.iter().any(|l| l == n)
        {
            continue;
        }
        out.entry(n.to_owned()).or_default().push(value.as_bytes().to_vec());
    }
    out
}

/// tokengate's lean client.
async fn lean(addr: SocketAddr, target: &str) -> Verdict {
    let authority: http::uri::Authority = addr.to_string().parse().unwrap();
    let slots = tokengate::upstream::limit::UpstreamSlots::new(4, Duration::from_secs(1));
    let pool = Arc::new(tokengate::upstream::h1::Pool::new(
        &authority,
        None,
        Duration::from_secs(1),
        Duration::from_secs(10),
        64 * 1024,
        &slots,
        None,
    ));
    let headers = http::HeaderMap::new();
    let head = tokengate::upstream::h1::Head { method: &http::Method::GET, target, headers: &headers };
    let Ok(Ok(tokengate::upstream::h1::Sent::Response(resp))) =
        tokio::time::timeout(Duration::from_secs(2), pool.send(&head, &Bytes::new())).await
    else {
        return Verdict::Refused;
    };
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(2), body.collect()).await;
    let body = match body {
        Ok(Ok(b)) => Some(b.to_bytes().to_vec()),
        _ => None,
    };
    let reusable = body.is_some() && pool.idle_connections() == 1;
    Verdict::Response { status: parts.status.as_u16(), headers: end_to_end(&parts.headers), body, reusable }
}

/// hyper's HTTP/1.1 client connection.
async fn hyper(addr: SocketAddr, target: &str) -> Verdict {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    else {
        return Verdict::Refused;
    };
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(target)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::new())
        .unwrap();
    let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), sender.send_request(req)).await else {
        return Verdict::Refused;
    };
    let (parts, body) = resp.into_parts();
    let body = match tokio::time::timeout(Duration::from_secs(2), body.collect()).await {
        Ok(Ok(b)) => Some(b.to_bytes().to_vec()),
        _ => None,
    };
    // hyper closes a connection it will not reuse; one it keeps is ready for the next request.
    let reusable = body.is_some()
        && matches!(tokio::time::timeout(Duration::from_millis(50), sender.ready()).await, Ok(Ok(())));
    Verdict::Response { status: parts.status.as_u16(), headers: end_to_end(&parts.headers), body, reusable }
}

/// Both verdicts for `bytes`, with a server of its own.
pub async fn both(bytes: Vec<u8>) -> (Verdict, Verdict) {
    Server::start().await.both(bytes).await
}

/// Whether the verdicts on `bytes` agree. Two differences are by design, both stricter:
/// - the lean client reads bodies of up to 64 KiB before it answers, so a body that breaks is a
///   refused exchange (a clean 502 downstream) where hyper hands over the head and then fails;
/// - a response with both Content-Length and Transfer-Encoding is smuggling bait (RFC 9112
///   section 6.3): the lean client does not reuse its connection, hyper does.
pub fn agree(bytes: &[u8], lean: &Verdict, hyper: &Verdict) -> bool {
    if lean == hyper || matches!((lean, hyper), (Verdict::Refused, Verdict::Response { body: None, .. })) {
        return true;
    }
    // The generated bodies never spell header names, so the whole text stands for the heads.
    let head = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    let both_framings = head.contains("\ncontent-length") && head.contains("\ntransfer-encoding");
    match (lean, hyper) {
        (
            Verdict::Response { status, headers, body, reusable: false },
            Verdict::Response { status: s, headers: h, body: b, reusable: true },
        ) if both_framings => status == s && headers == h && body == b,
        _ => false,
    }
}
