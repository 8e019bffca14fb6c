//! TLS client settings shared by upstream connections and token requests.
//!
//! Certificates are always verified against the public web PKI roots, plus an optional PEM CA
//! bundle (the way to trust a private CA). There is deliberately no switch to turn checks off.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A CA bundle that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no usable certificate.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The client certificate and key were refused by rustls.
    #[error("client certificate: {0}")]
    Identity(String),
    /// The upstream host cannot be a TLS server name (checked against its certificate).
    #[error("{host} is not a TLS server name: {reason}")]
    ServerName {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
}

/// A client certificate chain and its private key, for mutual TLS.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { certs: self.certs.clone(), key: self.key.clone_key() }
    }
}

impl Identity {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key, and checks that they
    /// belong together.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, String> {
        let crate::config::CertifiedPem { certs, key } = crate::config::certified_pem(cert_pem, key_pem)?;
        Ok(Identity { certs, key })
    }

    /// Reads and checks the files a configuration names.
    pub fn load(files: &crate::config::IdentityFiles) -> Result<Self, String> {
        let crate::config::CertifiedPem { certs, key } = files.check()?;
        Ok(Identity { certs, key })
    }
}

/// A rustls client configuration with ALPN set to `alpn` (e.g. `h2`, `http/1.1`).
pub fn client_config(ca_file: Option<&Path>, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(ca_file, alpn, None)
}

/// As [`client_config`], presenting `identity` when the server asks for a client certificate.
pub fn client_config_with(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
    identity: Option<Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let err = |reason: String| TlsError::CaFile { path: path.display().to_string(), reason };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::CaFile { path: String::new(), reason: e.to_string() })?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            builder.with_client_auth_cert(id.certs, id.key).map_err(|e| TlsError::Identity(e.to_string()))?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Inbound TLS settings that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("tls: {0}")]
pub struct ServerTlsError(String);

/// A rustls server configuration from PEM files, with client certificate verification against
/// `client_ca` when given (`required` refuses handshakes without a valid certificate).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
    required: bool,
) -> Result<rustls::ServerConfig, ServerTlsError> {
    use rustls::pki_types::PrivateKeyDer;
    let err = |what: &Path, e: &dyn std::fmt::Display| ServerTlsError(format!("{}: {e}", what.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| err(cert_file, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert_file, &e))?;
    if certs.is_empty() {
        return Err(err(cert_file, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| err(key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerTlsError(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| err(ca, &e))? {
                roots.add(cert.map_err(|e| err(ca, &e))?).map_err(|e| err(ca, &e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if required { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| err(ca, &e))?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| err(cert_file, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The TLS listener's settings, swapped whole on reload: handshakes after the swap use the new
/// certificate, connections already open keep their session.
pub type ServerTls = Arc<arc_swap::ArcSwap<rustls::ServerConfig>>;

/// The server configuration for the `tls:` listener section.
pub fn inbound(tls: &crate::config::InboundTls) -> Result<rustls::ServerConfig, ServerTlsError> {
    let required =
        tls.client_ca_file.is_some() && tls.client_cert != Some(crate::config::ClientCertMode::Optional);
    server_config(&tls.cert_file, &tls.key_file, tls.client_ca_file.as_deref(), required)
}
