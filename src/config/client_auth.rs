//! How an OAuth2 client proves who it is at the token endpoint: a secret (RFC 6749 section 2.3),
//! a signed assertion (RFC 7523: private_key_jwt, client_secret_jwt), a certificate (RFC 8705),
//! or an assertion someone else wrote to a file (workload identity federation).
//!
//! Key, certificate and assertion files are read here once, so a bad file is a load error
//! naming it, and again on every token fetch, so a rotated file is used without a reload.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::value::Text;
use crate::jose::SigningAlg;
use crate::secret::Secret;

/// The client authentication method, with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (client_secret_basic).
    Basic(Secret),
    /// Basic without the form-urlencoding step, for servers that do not decode it.
    BasicRaw(Secret),
    /// `client_id` and `client_secret` in the form body (client_secret_post).
    Post(Secret),
    /// Public client: only `client_id` in the body.
    None,
    /// An HS256 assertion signed with the client secret (client_secret_jwt).
    SecretJwt(Secret),
    /// An assertion signed with a private key (private_key_jwt).
    PrivateKeyJwt(KeyFile),
    /// Mutual TLS with a client certificate (tls_client_auth, self_signed_tls_client_auth).
    Tls {
        /// The certificate and key.
        identity: IdentityFiles,
        /// `self_signed_tls_client_auth`: the server pins the certificate, not its issuer.
        self_signed: bool,
    },
    /// An assertion made by someone else (a projected service-account token), re-read on every
    /// fetch.
    AssertionFile {
        /// The file.
        path: PathBuf,
        /// `client_assertion_type`.
        assertion_type: String,
    },
}

impl ClientAuth {
    /// The method's registered name (RFC 8414 `token_endpoint_auth_methods_supported`).
    pub fn name(&self) -> &'static str {
        match self {
            ClientAuth::Basic(_) => "client_secret_basic",
            ClientAuth::BasicRaw(_) => "client_secret_basic (raw)",
            ClientAuth::Post(_) => "client_secret_post",
            ClientAuth::None => "none",
            ClientAuth::SecretJwt(_) => "client_secret_jwt",
            ClientAuth::PrivateKeyJwt(_) => "private_key_jwt",
            ClientAuth::Tls { self_signed: false, .. } => "tls_client_auth",
            ClientAuth::Tls { self_signed: true, .. } => "self_signed_tls_client_auth",
            ClientAuth::AssertionFile { .. } => "client_assertion_file",
        }
    }

    /// The client secret this method sends or signs with.
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            ClientAuth::Basic(s)
            | ClientAuth::BasicRaw(s)
            | ClientAuth::Post(s)
            | ClientAuth::SecretJwt(s) => Some(s),
            _ => None,
        }
    }

    /// The client certificate, for methods that use mutual TLS.
    pub fn identity(&self) -> Option<&IdentityFiles> {
        match self {
            ClientAuth::Tls { identity, .. } => Some(identity),
            _ => None,
        }
    }
}

/// A signing key in a PEM file; `alg` is settled when the configuration is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFile {
    /// The PEM private key.
    pub path: PathBuf,
    /// The JWS algorithm.
    pub alg: SigningAlg,
    /// The `kid` header; the key's JWK thumbprint when not set.
    pub key_id: Option<String>,
    /// A certificate for the key, whose SHA-256 thumbprint goes into `x5t#S256`.
    pub cert_file: Option<PathBuf>,
}

impl KeyFile {
    /// Reads the key's PEM and the certificate's, when there is one.
    pub fn read(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
        let pem = std::fs::read(&self.path)
            .map_err(|e| format!("cannot read private_key_file {:?}: {e}", self.path))?;
        let cert = match &self.cert_file {
            Some(p) => {
                Some(std::fs::read(p).map_err(|e| format!("cannot read signing_cert_file {p:?}: {e}"))?)
            }
            None => None,
        };
        Ok((pem, cert))
    }
}

/// Checks at load time that a file read on every fetch is there; `key` names it in the error.
pub(super) fn readable(key: &str, path: PathBuf) -> Result<PathBuf, String> {
    super::value::no_tilde(&path.to_string_lossy()).map_err(|e| format!("{key} {e}"))?;
    std::fs::metadata(&path).map_err(|e| format!("cannot read {key} {path:?}: {e}"))?;
    Ok(path)
}

/// A client certificate and its key in PEM files.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityFiles {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key.
    pub key_file: PathBuf,
}

impl IdentityFiles {
    /// Reads both files; the bytes also tell whether they changed since the last read.
    pub fn read(&self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let cert = std::fs::read(&self.cert_file)
            .map_err(|e| format!("cannot read client_cert_file {:?}: {e}", self.cert_file))?;
        let key = std::fs::read(&self.key_file)
            .map_err(|e| format!("cannot read client_key_file {:?}: {e}", self.key_file))?;
        Ok((cert, key))
    }

    /// Reads both files now and checks that they hold a certificate chain and the private key
    /// that belongs to it.
    pub fn check(&self) -> Result<CertifiedPem, String> {
        let (cert, key) = self.read()?;
        certified_pem(&cert, &key).map_err(|e| {
            format!("client_cert_file {:?} / client_key_file {:?}: {e}", self.cert_file, self.key_file)
        })
    }
}

/// A PEM certificate chain (leaf first) and its private key, parsed and checked to belong
/// together.
pub struct CertifiedPem {
    /// The chain.
    pub certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The key.
    pub key: rustls_pki_types::PrivateKeyDer<'static>,
}

/// Parses a PEM certificate chain and a PEM private key and checks that they belong together.
pub fn certified_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedPem, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key file holds no PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("the key cannot be used: {e}"))?;
    rustls::sign::CertifiedKey::new(certs.clone(), signing)
        .keys_match()
        .map_err(|_| "the private key does not belong to the certificate".to_owned())?;
    Ok(CertifiedPem { certs, key })
}

/// Whom a self-made assertion is addressed to (`aud`).
#[derive(Debug, Clone, PartialEq)]
pub enum Audience {
    /// The issuer identifier (RFC 7523bis); the default with discovery.
    Issuer,
    /// The token endpoint URL (OIDC Core section 9); the default with `token_url`.
    TokenEndpoint,
    /// A fixed value.
    Fixed(String),
}

/// Settings of the assertions tokengate signs itself.
#[derive(Debug, Clone, PartialEq)]
pub struct AssertionSettings {
    /// `aud`.
    pub audience: Audience,
    /// `exp - iat`.
    pub lifetime: Duration,
}

/// Longest lifetime of a self-made assertion: each is used once, right after it is made.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// The `client_assertion_type` of JWT assertions (RFC 7523 section 2.2).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `client_auth` as written.
#[derive(Deserialize, schemars::JsonSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub(super) enum Method {
    Basic,
    BasicRaw,
    Post,
    None,
    #[serde(alias = "client_secret_basic")]
    ClientSecretBasic,
    #[serde(alias = "client_secret_post")]
    ClientSecretPost,
    ClientSecretJwt,
    PrivateKeyJwt,
    TlsClientAuth,
    SelfSignedTlsClientAuth,
    ClientAssertionFile,
}

/// The client-authentication keys of a raw provider.
pub(super) struct RawClientAuth {
    pub method: Option<Method>,
    pub secret: Option<Secret>,
    pub key: Option<KeyFile>,
    pub client_cert_file: Option<Text>,
    pub client_key_file: Option<Text>,
    pub client_assertion_file: Option<Text>,
    pub client_assertion_type: Option<Text>,
}

/// Reads the signing key settings, parsing the key now so a bad file fails the load and the
/// algorithm is known.
pub(super) fn key_file(
    private_key_file: Option<Text>,
    signing_alg: Option<SigningAlg>,
    key_id: Option<Text>,
    signing_cert_file: Option<Text>,
) -> Result<Option<KeyFile>, String> {
    let Some(path) = private_key_file else {
        return match (signing_alg, key_id, signing_cert_file) {
            (None, None, None) => Ok(None),
            (Some(_), ..) => Err("signing_alg needs private_key_file".into()),
            (_, Some(_), _) => Err("key_id needs private_key_file".into()),
            (.., Some(_)) => Err("signing_cert_file needs private_key_file".into()),
        };
    };
    super::files::record(&path.0);
    let cert_file = signing_cert_file.map(|t| PathBuf::from(t.0));
    if let Some(c) = &cert_file {
        super::files::record(c);
    }
    let mut key = KeyFile {
        path: PathBuf::from(path.0),
        alg: signing_alg.unwrap_or(SigningAlg::RS256),
        key_id: key_id.map(|t| t.0).filter(|k| !k.is_empty()),
        cert_file,
    };
    let (pem, cert) = key.read()?;
    // The key decides the default algorithm.
    let parsed = crate::jose::SigningKey::from_pem(&pem, signing_alg, key.key_id.as_deref(), cert.as_deref())
        .map_err(|e| format!("private_key_file {:?} {e}", key.path))?;
    key.alg = parsed.alg();
    Ok(Some(key))
}

impl RawClientAuth {
    /// The method: `client_auth` when given, else Basic with a secret.
    pub fn build(self, public_default: bool) -> Result<ClientAuth, String> {
        let method = match self.method {
            Some(m) => m,
            None if self.secret.is_some() => Method::Basic,
            None if public_default => Method::None,
            None => {
                return Err(
                    "needs client_secret (or client_secret_file), or client_auth: private_key_jwt, tls_client_auth, client_assertion_file or none".into(),
                );
            }
        };
        let identity = match (self.client_cert_file, self.client_key_file) {
            (Some(c), Some(k)) => {
                super::files::record(&c.0);
                super::files::record(&k.0);
                Some(IdentityFiles { cert_file: PathBuf::from(c.0), key_file: PathBuf::from(k.0) })
            }
            (None, None) => None,
            (Some(_), None) => return Err("client_cert_file needs client_key_file".into()),
            (None, Some(_)) => return Err("client_key_file needs client_cert_file".into()),
        };
        let uses = |what: &str, used: bool, set: bool| -> Result<(), String> {
            if set && !used {
                return Err(format!("{what} does not apply to client_auth: {}", method_name(method)));
            }
            Ok(())
        };
        let secret_method = matches!(
            method,
            Method::Basic
                | Method::BasicRaw
                | Method::Post
                | Method::ClientSecretBasic
                | Method::ClientSecretPost
                | Method::ClientSecretJwt
        );
        let tls = matches!(method, Method::TlsClientAuth | Method::SelfSignedTlsClientAuth);
        uses("client_secret", secret_method, self.secret.is_some())?;
        uses("client_cert_file", tls, identity.is_some())?;
        uses(
            "client_assertion_file",
            method == Method::ClientAssertionFile,
            self.client_assertion_file.is_some(),
        )?;
        uses(
            "client_assertion_type",
            method == Method::ClientAssertionFile,
            self.client_assertion_type.is_some(),
        )?;
        let secret = || -> Result<Secret, String> {
            match &self.secret {
                None => Err(format!(
                    "client_auth: {} needs client_secret (or client_secret_file)",
                    method_name(method)
                )),
                Some(s) if s.is_empty() => Err("client_secret is empty".into()),
                Some(s) => Ok(s.clone()),
            }
        };
        Ok(match method {
            Method::Basic | Method::ClientSecretBasic => ClientAuth::Basic(secret()?),
            Method::BasicRaw => ClientAuth::BasicRaw(secret()?),
            Method::Post | Method::ClientSecretPost => ClientAuth::Post(secret()?),
            Method::ClientSecretJwt => ClientAuth::SecretJwt(secret()?),
            Method::None => ClientAuth::None,
            Method::PrivateKeyJwt => ClientAuth::PrivateKeyJwt(
                self.key.ok_or("client_auth: private_key_jwt needs private_key_file")?,
            ),
            Method::TlsClientAuth | Method::SelfSignedTlsClientAuth => {
                let identity = identity.ok_or_else(|| {
                    format!("client_auth: {} needs client_cert_file and client_key_file", method_name(method))
                })?;
                identity.check()?;
                ClientAuth::Tls { identity, self_signed: method == Method::SelfSignedTlsClientAuth }
            }
            Method::ClientAssertionFile => {
                let path = self
                    .client_assertion_file
                    .ok_or("client_auth: client_assertion_file needs client_assertion_file: PATH")?;
                ClientAuth::AssertionFile {
                    path: readable("client_assertion_file", PathBuf::from(path.0))?,
                    assertion_type: self
                        .client_assertion_type
                        .map_or_else(|| JWT_BEARER_ASSERTION.to_owned(), |t| t.0),
                }
            }
        })
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Basic => "basic",
        Method::BasicRaw => "basic_raw",
        Method::Post => "post",
        Method::None => "none",
        Method::ClientSecretBasic => "client_secret_basic",
        Method::ClientSecretPost => "client_secret_post",
        Method::ClientSecretJwt => "client_secret_jwt",
        Method::PrivateKeyJwt => "private_key_jwt",
        Method::TlsClientAuth => "tls_client_auth",
        Method::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        Method::ClientAssertionFile => "client_assertion_file",
    }
}

/// Reads `assertion_audience` and `assertion_lifetime`.
pub(super) fn assertion_settings(
    audience: Option<Text>,
    lifetime: Option<Duration>,
    discovery: bool,
) -> Result<AssertionSettings, String> {
    let audience = match audience.as_ref().map(|t| t.0.as_str()) {
        None if discovery => Audience::Issuer,
        None | Some("token_endpoint") => Audience::TokenEndpoint,
        Some("issuer") if discovery => Audience::Issuer,
        Some("issuer") => {
            return Err("assertion_audience: issuer needs issuer (OIDC discovery); with token_url, write the issuer's URL".into());
        }
        Some("") => return Err("assertion_audience is empty".into()),
        Some(other) => Audience::Fixed(other.to_owned()),
    };
    let lifetime = lifetime.unwrap_or(Duration::from_secs(60));
    if lifetime < Duration::from_secs(10) || lifetime > MAX_ASSERTION_LIFETIME {
        return Err("assertion_lifetime must be between 10s and 5m".into());
    }
    Ok(AssertionSettings { audience, lifetime })
}
