//! The upstream socket: plain TCP, or TLS over TCP (rustls) for `https://` upstreams, carrying
//! HTTP/1.1 (the lean client) or HTTP/2 (hyper's, when ALPN chose `h2`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

/// rustls reads TLS records 4 KiB at a time; a buffer under it that holds a whole record (16 KiB
/// of data plus framing) turns the reads of a 16 KiB response from five system calls into one.
const TLS_READ_BUF: usize = 16 * 1024 + 512;

/// How to open TLS to one upstream: the client settings (trust, the ALPN protocols offered, the
/// session cache that makes later handshakes resumptions) and the name the certificate must carry.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl Tls {
    /// TLS to `host`, trusting the public roots and `ca_file`, presenting `identity` when the
    /// upstream asks for a client certificate, offering `alpn` (in order of preference).
    pub fn new(
        host: &str,
        ca_file: Option<&std::path::Path>,
        identity: Option<crate::tls::Identity>,
        alpn: &[&[u8]],
    ) -> Result<Self, crate::tls::TlsError> {
        let config = crate::tls::client_config_with(ca_file, alpn, identity)?;
        // An IP literal in brackets (`[::1]`) is a name without them.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(bare.to_owned()).map_err(|e| {
            crate::tls::TlsError::CaFile {
                path: host.to_owned(),
                reason: format!("not a TLS server name: {e}"),
            }
        })?;
        let config = Arc::new(config);
        Ok(Tls { connector: tokio_rustls::TlsConnector::from(config.clone()), config, name })
    }

    /// The same settings offering only HTTP/1.1, for requests that need it (upgrades).
    pub fn http1_only(&self) -> Tls {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        Tls { connector: tokio_rustls::TlsConnector::from(config.clone()), config, name: self.name.clone() }
    }
}

/// Why the upstream's certificate was refused, with what to do about it, if that is why `e`
/// (or one of its causes) failed.
pub fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::CertificateError as C;
    let mut cur = Some(e);
    while let Some(c) = cur {
        let tls = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = tls {
            return Some(match cert {
                C::UnknownIssuer => "its certificate is signed by a CA tokengate does not trust (UnknownIssuer): for a private CA, set the route's ca_file to the CA's PEM bundle".into(),
                C::NotValidForName | C::NotValidForNameContext { .. } => "its certificate does not name the host tokengate connected to (NotValidForName): use the name the certificate carries in upstream, or set server_name".into(),
                C::Expired | C::ExpiredContext { .. } => "its certificate has expired".into(),
                C::NotValidYet | C::NotValidYetContext { .. } => "its certificate is not valid yet (check the clocks)".into(),
                other => format!("its certificate was refused: {other:?}"),
            });
        }
        cur = c.source();
    }
    None
}

/// An open upstream connection.
pub enum Stream {
    /// `http://`.
    Plain(TcpStream),
    /// `https://`.
    Tls(Box<tokio_rustls::client::TlsStream<BufReader<TcpStream>>>),
}

impl Stream {
    /// Connects to `addr` by `path`, with TLS when `tls` is given, all within `timeout`.
    pub async fn connect(
        addr: &str,
        path: super::egress::Path<'_>,
        tls: Option<&Tls>,
        timeout: Duration,
    ) -> std::io::Result<Option<Self>> {
        let open = async {
            let tcp = super::egress::connect(addr, path).await?;
            tcp.set_nodelay(true)?;
            match tls {
                None => Ok(Stream::Plain(tcp)),
                Some(t) => {
                    let buffered = BufReader::with_capacity(TLS_READ_BUF, tcp);
                    Ok(Stream::Tls(Box::new(t.connector.connect(t.name.clone(), buffered).await?)))
                }
            }
        };
        match tokio::time::timeout(timeout, open).await {
            Err(_) => Ok(None),
            Ok(r) => r.map(Some),
        }
    }

    /// The protocol ALPN settled on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => tls.get_ref().1.alpn_protocol(),
        }
    }

    /// Writes `data` whole and pushes it onto the wire (TLS buffers records until flushed).
    pub async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data).await?;
        if let Stream::Tls(_) = self {
            self.flush().await?;
        }
        Ok(())
    }

    /// An idle connection has nothing to read; readable means closed by the peer or garbage. For
    /// plain TCP the readiness check costs no system call. Over TLS, bytes may also be a session
    /// ticket (TLS 1.3 servers send them after the handshake), so they are read through TLS:
    /// no application data means the connection is still good.
    pub fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            Stream::Plain(io) => match io.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                // Readiness can be left over from the last read: ask the socket.
                Poll::Ready(Ok(())) => {
                    matches!(io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                }
            },
            Stream::Tls(tls) => match tls.get_ref().0.get_ref().poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                Poll::Ready(Ok(())) => {
                    let mut byte = [0u8; 1];
                    let mut buf = ReadBuf::new(&mut byte);
                    // Pending: what arrived was TLS housekeeping. Ready: end of stream, an error,
                    // or data nobody asked for; none of them leaves a usable connection.
                    Pin::new(&mut **tls).poll_read(&mut cx, &mut buf).is_pending()
                }
            },
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Stream::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_write(cx, data),
            Stream::Tls(io) => Pin::new(&mut **io).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_flush(cx),
            Stream::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}
