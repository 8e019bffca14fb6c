//! WebSocket through routes with `websocket: true`: a real WebSocket client (tungstenite, over
//! HTTP/1.1 or HTTP/2 extended CONNECT) talks through tokengate to a real WebSocket server that
//! checks the credential on the handshake, and tokengate closes tunnels with 1001 when their
//! lifetime ends, they idle or it shuts down.
#![allow(clippy::unwrap_used, clippy::result_large_err)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

/// What the upstream saw of one handshake.
#[derive(Clone, Debug)]
struct Handshake {
    target: String,
    authorization: Option<String>,
    key: Option<String>,
}

/// A WebSocket server that records each handshake, echoes every message and records the close
/// code each connection ended with (`None`: no close frame came).
#[derive(Clone)]
struct WsUpstream {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    closes: Arc<Mutex<Vec<Option<u16>>>>,
}

impl WsUpstream {
    /// Refuses the first `refuse` handshakes with 401.
    async fn start(refuse: usize) -> WsUpstream {
        Self::start_tls(refuse, None).await
    }

    /// Over TLS when `tls` is given (`wss://`).
    async fn start_tls(refuse: usize, tls: Option<rustls::ServerConfig>) -> WsUpstream {
        let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
        let up = WsUpstream {
            addr: listener.local_addr().unwrap(),
            handshakes: Arc::default(),
            closes: Arc::default(),
        };
        let u = up.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (u, acceptor) = (u.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        None => u.serve(tcp, refuse).await,
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                u.serve(tls, refuse).await;
                            }
                        }
                    }
                });
            }
        });
        up
    }

    async fn serve<S>(&self, tcp: S, refuse: usize)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let handshakes = self.handshakes.clone();
        let callback = move |req: &tungstenite::handshake::server::Request,
                             resp: tungstenite::handshake::server::Response| {
            let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
            let mut seen = handshakes.lock().unwrap();
            seen.push(Handshake {
                target: req.uri().to_string(),
                authorization: header("authorization"),
                key: header("sec-websocket-key"),
            });
            if seen.len() <= refuse {
                let mut refused = tungstenite::handshake::server::ErrorResponse::new(Some("expired".into()));
                *refused.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
                return Err(refused);
            }
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else { return };
        let mut code = None;
        while let Some(Ok(msg)) = ws.next().await {
            match &msg {
                Message::Close(frame) => {
                    code = frame.as_ref().map(|f| u16::from(f.code));
                    break;
                }
                Message::Text(_) | Message::Binary(_) => {
                    let Ok(()) = ws.send(msg).await else { break };
                }
                _ => {}
            }
        }
        self.closes.lock().unwrap().push(code);
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    fn last(&self) -> Handshake {
        self.handshakes.lock().unwrap().last().cloned().unwrap()
    }

    async fn closed_with(&self, n: usize) -> Vec<Option<u16>> {
        for _ in 0..100 {
            if self.closes.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.closes.lock().unwrap().clone()
    }
}

/// tokengate with provider `idp` and one route per `(prefix, extra keys)` to `up`.
async fn tokengate(
    idp: &Idp,
    up: &WsUpstream,
    limits: &str,
    routes: &[(&str, &str)],
) -> tokengate::server::Running {
    let mut yaml = format!("{limits}{}routes:\n", idp.provider_yaml());
    for (prefix, extra) in routes {
        yaml.push_str(&format!(
            "  - prefix: {prefix}\n    upstream: {}\n    provider: idp\n{extra}",
            up.url("ws")
        ));
    }
    start(&yaml).await
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket through tokengate over HTTP/1.1, sending `authorization` if given.
async fn open(tg: &tokengate::server::Running, path: &str) -> Result<Client, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}{path}", tg.proxy_addr).into_client_request().unwrap();
    req.headers_mut().insert("authorization", "Bearer the-clients-own".parse().unwrap());
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

/// Sends a text and a 300 KB binary message and expects both back.
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
}

/// Closes with 1000 (normal) and waits for the connection to end.
async fn goodbye<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "".into() };
    ws.close(Some(frame)).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

/// The close frame the client got next, if any.
async fn close_code<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, within: Duration) -> Option<CloseCode>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let next = tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    });
    next.await.expect("the tunnel was not closed in time")
}

#[tokio::test]
async fn the_handshake_carries_the_token_and_messages_flow_both_ways() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket: true\n")]).await;
    let mut ws = open(&tg, "/ws/streams?x=1").await.unwrap();
    echo(&mut ws).await;
    let seen = up.last();
    assert_eq!(seen.target, "/streams?x=1");
    let authorization = seen.authorization.unwrap();
    assert!(idp.valid(&authorization), "{authorization}: the client's own value must be replaced");
    goodbye(ws).await;
    assert_eq!(up.closed_with(1).await, vec![Some(1000)], "the client's close frame went through");
    let series = "tokengate_websocket_closed_total{reason=\"client\",route=\"/ws\"}";
    for _ in 0..50 {
        if metric_value(tg.admin_addr, series).await == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric_value(tg.admin_addr, series).await, Some(1.0));
    tg.shutdown().await;
}

/// Corti's streams take the token as `token=Bearer%20<token>` in the query.
#[tokio::test]
async fn the_token_can_travel_in_the_query_as_corti_wants() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/audio", "    inject: { query: token, scheme: Bearer }\n")]).await;
    let mut ws = open(&tg, "/audio/streams?tenant-name=acme&token=forged").await.unwrap();
    echo(&mut ws).await;
    let seen = up.last();
    let (kept, token) = seen.target.rsplit_once("&token=").unwrap();
    assert_eq!(kept, "/streams?tenant-name=acme");
    assert!(idp.valid(&token.replace("Bearer%20", "Bearer ")), "{}", seen.target);
    assert_eq!(seen.authorization, None, "the client's Authorization must not reach the upstream");
}

#[tokio::test]
async fn an_http2_client_opens_a_websocket_with_extended_connect() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket: true\n")]).await;
    let tcp = tokio::net::TcpStream::connect(tg.proxy_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("http://{}/ws/chat", tg.proxy_addr))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let io = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(io),
        tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    echo(&mut ws).await;
    let seen = up.last();
    assert_eq!(seen.target, "/chat");
    assert!(idp.valid(&seen.authorization.unwrap()));
    assert!(seen.key.is_some_and(|k| k.len() == 24), "tokengate makes the HTTP/1.1 key");
    goodbye(ws).await;
    assert_eq!(up.closed_with(1).await, vec![Some(1000)]);
}

#[tokio::test]
async fn upgrades_a_route_does_not_forward_are_refused_plainly() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/plain", ""), ("/ws", "    websocket: true\n")]).await;
    // The route is plain HTTP; its upstream is written ws://, which implies websocket: true, so
    // this route names http:// explicitly.
    let http_route = format!(
        "{}routes:\n  - prefix: /plain\n    upstream: http://{}\n    provider: idp\n",
        idp.provider_yaml(),
        up.addr
    );
    let plain = start(&http_route).await;
    let handshake = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    let answer = raw(plain.proxy_addr, handshake("/plain/x", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 501") && answer.contains("websocket: true"), "{answer}");
    let other = "GET /ws/x HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n";
    let answer = raw(tg.proxy_addr, other.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 501") && answer.contains("only WebSocket"), "{answer}");
    let no_connection = "GET /ws/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let answer = raw(tg.proxy_addr, no_connection.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("Connection: upgrade"), "{answer}");
    let with_body = handshake("/ws/x", "Content-Length: 5\r\n") + "hello";
    let answer = raw(tg.proxy_addr, with_body.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("no body"), "{answer}");
    let post = handshake("/ws/x", "").replacen("GET", "POST", 1);
    let answer = raw(tg.proxy_addr, post.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("invalid_websocket_handshake"), "{answer}");
    assert!(up.handshakes.lock().unwrap().is_empty(), "nothing refused reached the upstream");
}

/// An upstream 401 on the handshake gets the same treatment as on any request: one more try
/// with a new token.
#[tokio::test]
async fn a_refused_handshake_is_tried_again_with_a_new_token() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(1).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket: true\n")]).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    echo(&mut ws).await;
    let seen = up.handshakes.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].authorization, seen[1].authorization, "the second try carries a new token");

    // Refused twice: the client gets the upstream's 401.
    let up = WsUpstream::start(usize::MAX).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket: true\n")]).await;
    match open(&tg, "/ws/x").await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_tunnel_closes_with_1001_when_its_lifetime_ends() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket_max_lifetime: 1s\n")]).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    echo(&mut ws).await;
    let opened = std::time::Instant::now();
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, Some(CloseCode::Away));
    assert!(opened.elapsed() < Duration::from_secs(2), "{:?}", opened.elapsed());
    assert_eq!(up.closed_with(1).await, vec![Some(1001)], "the upstream is told too");
}

/// `websocket_max_lifetime: token`: the tunnel ends before the token it was opened with, so the
/// client reconnects with a fresh one.
#[tokio::test]
async fn a_tunnel_closes_before_its_token_expires() {
    let idp = Idp::start(IdpOptions { lifetime: Duration::from_secs(3), ..IdpOptions::default() }).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket_max_lifetime: token\n")]).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    let first = up.last().authorization.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, Some(CloseCode::Away));
    assert!(idp.valid(&first), "closed while its token was still valid");
    let mut again = open(&tg, "/ws/x").await.unwrap();
    echo(&mut again).await;
    let second = up.last().authorization.unwrap();
    assert!(idp.valid(&second) && second != first, "the new tunnel has a fresh token");
}

#[tokio::test]
async fn an_idle_tunnel_closes_after_idle_timeout_and_traffic_keeps_it_open() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "limits:\n  idle_timeout: 1s\n", &[("/ws", "    websocket: true\n")]).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    // Talking every 400 ms for 2 s: never idle for 1 s.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    }
    assert_eq!(close_code(&mut ws, Duration::from_secs(3)).await, Some(CloseCode::Away));
    assert_eq!(up.closed_with(1).await, vec![Some(1001)]);
}

#[tokio::test]
async fn shutdown_closes_tunnels_with_1001() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg = tokengate(&idp, &up, "", &[("/ws", "    websocket: true\n")]).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    echo(&mut ws).await;
    let stopped = tokio::spawn(tg.shutdown());
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, Some(CloseCode::Away));
    tokio::time::timeout(Duration::from_secs(5), stopped).await.unwrap().unwrap();
    assert_eq!(up.closed_with(1).await, vec![Some(1001)]);
}

/// A tunnel holds its downstream connection's slot: with `max_connections: 1` a second client
/// waits until the tunnel closes, and the open tunnel is never evicted for it.
#[tokio::test]
async fn a_tunnel_counts_against_the_connection_limit() {
    let idp = Idp::start(IdpOptions::default()).await;
    let up = WsUpstream::start(0).await;
    let tg =
        tokengate(&idp, &up, "limits:\n  max_connections: 1\n", &[("/ws", "    websocket: true\n")]).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    let waiting = tokio::spawn(open_owned(tg.proxy_addr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a second connection was served while the tunnel held the only slot");
    echo(&mut ws).await;
    goodbye(ws).await;
    let mut second = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
    echo(&mut second).await;
}

async fn open_owned(addr: SocketAddr) -> Client {
    tokio_tungstenite::connect_async(format!("ws://{addr}/ws/y")).await.unwrap().0
}

/// `wss://`: TLS to the upstream, offering only HTTP/1.1 (an upgrade is HTTP/1.1), with the
/// route's CA; the upstream here offers h2 first and must not get it.
#[tokio::test]
async fn a_wss_upstream_is_reached_over_tls() {
    let pki = pki();
    let idp = Idp::start(IdpOptions::default()).await;
    let mut tls = tokengate::tls::server_config(&pki.server_cert, &pki.server_key, None, false).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let up = WsUpstream::start_tls(0, Some(tls)).await;
    let yaml = format!(
        "{}routes:\n  - prefix: /ws\n    upstream: wss://localhost:{}\n    provider: idp\n    ca_file: {}\n",
        idp.provider_yaml(),
        up.addr.port(),
        pki.ca.display()
    );
    let tg = start(&yaml).await;
    let mut ws = open(&tg, "/ws/x").await.unwrap();
    echo(&mut ws).await;
    assert!(idp.valid(&up.last().authorization.unwrap()));
}

/// An upstream that answers 101 without accepting the key it was sent is not a WebSocket
/// server: the client gets 502 and no tunnel.
#[tokio::test]
async fn a_switch_without_the_right_accept_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idp = Idp::start(IdpOptions::default()).await;
    let listener = tokio::net::TcpListener::bind(any()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = vec![0; 4096];
            let _ = tcp.read(&mut buf).await;
            let answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\nsmuggled";
            let _ = tcp.write_all(answer.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let yaml = format!(
        "{}routes:\n  - prefix: /ws\n    upstream: ws://{addr}\n    provider: idp\n",
        idp.provider_yaml()
    );
    let tg = start(&yaml).await;
    match open(&tg, "/ws/x").await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 502),
        other => panic!("{:?}", other.map(|_| ())),
    }
}
