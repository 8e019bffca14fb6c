//! Who is calling: the first caller of the configuration (`callers:`) whose methods the request
//! satisfies, by an API key, a validated JWT (signature against the issuer's keys, `iss`, `aud`,
//! `exp`, `nbf`, `sub`) or its source address.

mod jwks;

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;

use crate::config::{Callers, JwtCaller, Method, MethodKind};

/// Why a request could not be told apart.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejected {
    /// A bearer token was presented and is not good.
    #[error("{0}")]
    Invalid(String),
    /// The issuer's signing keys cannot be read, so no token of it can be checked now.
    #[error("{0}")]
    KeysUnavailable(String),
}

/// The caller of a request, and for a caller known by its JWT, who the token is for.
pub struct Identified<'a> {
    /// The caller's name.
    pub name: &'a str,
    /// The JWT's issuer and subject, and the token itself (to exchange on the caller's behalf).
    pub subject: Option<Subject>,
}

/// The holder of a validated JWT.
#[derive(Clone)]
pub struct Subject {
    /// `iss` and `sub`, which key the tokens exchanged for it.
    pub key: String,
    /// The token.
    pub token: crate::secret::Secret,
}

/// The callers of a configuration, with their key sources.
pub struct Identify {
    callers: Vec<(String, Vec<Check>, Vec<MethodKind>)>,
    api_key_header: http::HeaderName,
    // Some caller is known by JWT: bearer tokens are read as JWTs.
    any_jwt: bool,
}

enum Check {
    ApiKeys(Vec<crate::secret::Secret>),
    Jwt(Box<JwtCaller>, Arc<jwks::Jwks>),
    ClientCert(crate::config::CertMatch),
    Allow(Vec<crate::config::Cidr>),
}

/// What a request presents, read once.
struct Presented<'a> {
    api_key: Option<&'a [u8]>,
    jwt: Option<Jwt<'a>>,
    remote: IpAddr,
    peer: Option<&'a PeerCert>,
}

/// A bearer token shaped like a JWT, with what every JWT caller looks at first: its (unverified)
/// issuer and its digest, which keys the verified tokens.
struct Jwt<'a> {
    token: &'a str,
    issuer: Option<String>,
    digest: ring::digest::Digest,
}

impl<'a> Jwt<'a> {
    fn read(token: &'a str) -> Option<Self> {
        looks_like_jwt(token).then(|| Jwt {
            token,
            issuer: unverified_issuer(token),
            digest: ring::digest::digest(&ring::digest::SHA256, token.as_bytes()),
        })
    }
}

impl Identify {
    /// The callers of `callers`; API keys come in `api_key_header`.
    pub fn new(callers: &Callers, api_key_header: http::HeaderName) -> Result<Self, String> {
        let mut built = Vec::new();
        for (name, caller) in &callers.0 {
            let checks = caller
                .methods
                .iter()
                .map(|m| {
                    Ok(match m {
                        Method::ApiKeys { keys, .. } => Check::ApiKeys(keys.clone()),
                        Method::Jwt(j) => Check::Jwt(
                            j.clone(),
                            Arc::new(jwks::Jwks::new(j).map_err(|e| format!("caller {name}: {e}"))?),
                        ),
                        Method::Allow(blocks) => Check::Allow(blocks.clone()),
                        Method::ClientCert(m) => Check::ClientCert(m.clone()),
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            built.push((name.clone(), checks, caller.require.clone()));
        }
        let any_jwt = built.iter().any(|(_, checks, _)| checks.iter().any(|c| matches!(c, Check::Jwt(..))));
        Ok(Identify { callers: built, api_key_header, any_jwt })
    }

    /// The caller of a request with `headers` from `remote` (with the verified client
    /// certificate `peer`): `Ok(None)` when no caller matches, `Err` when a JWT was presented
    /// that no caller accepts (it must not pass as anyone).
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        remote: IpAddr,
        peer: Option<&PeerCert>,
    ) -> Result<Option<Identified<'_>>, Rejected> {
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let api_key = headers.get(&self.api_key_header).map(|v| v.as_bytes());
        let jwt = bearer.filter(|_| self.any_jwt).and_then(Jwt::read);
        let presented = Presented { api_key, jwt, remote, peer };
        let mut token_error: Option<Rejected> = None;
        // Some caller's issuer is the token's.
        let mut issuer_known = false;
        let mut subject: Option<Subject> = None;
        for (name, checks, require) in &self.callers {
            let mut matched = Vec::new();
            for check in checks {
                match check.run(&presented).await {
                    Ok(Verdict::Yes(holder)) => {
                        if let (Some(key), Some(token)) = (holder, bearer) {
                            issuer_known = true;
                            subject = Some(Subject { key, token: crate::secret::Secret::new(token) });
                        }
                        matched.push(check.kind());
                    }
                    Ok(Verdict::OtherSubject) => issuer_known = true,
                    Ok(Verdict::No) => {}
                    Err(e) => {
                        token_error.get_or_insert(e);
                    }
                }
                if require.is_empty() && !matched.is_empty() {
                    return Ok(Some(Identified { name, subject }));
                }
            }
            if !require.is_empty() && require.iter().all(|k| matched.contains(k)) {
                return Ok(Some(Identified { name, subject }));
            }
            subject = None;
        }
        match (token_error, &presented.jwt, issuer_known) {
            (Some(e), _, _) => Err(e),
            // A JWT no caller's issuer claims: refused too, rather than passed on unidentified.
            (None, Some(_), false) => {
                Err(Rejected::Invalid("the token is from another issuer than any caller's".into()))
            }
            _ => Ok(None),
        }
    }
}

fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

impl Check {
    fn kind(&self) -> MethodKind {
        match self {
            Check::ApiKeys(_) => MethodKind::ApiKeys,
            Check::Jwt(..) => MethodKind::Jwt,
            Check::ClientCert(_) => MethodKind::ClientCert,
            Check::Allow(_) => MethodKind::Allow,
        }
    }

    /// Whether the request satisfies this method; `Err` for a JWT of this caller's issuer that
    /// is not valid.
    async fn run(&self, p: &Presented<'_>) -> Result<Verdict, Rejected> {
        let yes = |b: bool| if b { Verdict::Yes(None) } else { Verdict::No };
        match self {
            Check::ApiKeys(keys) => Ok(yes(p.api_key.is_some_and(|k| crate::config::accepts_any(keys, k)))),
            Check::Allow(blocks) => Ok(yes(blocks.iter().any(|b| b.contains(p.remote)))),
            Check::ClientCert(m) => Ok(yes(p.peer.is_some_and(|peer| match m {
                crate::config::CertMatch::Subject(s) => peer.subject == *s,
                crate::config::CertMatch::SanDns(d) => peer.dns.iter().any(|n| n == d),
                crate::config::CertMatch::SanUri(u) => peer.uris.iter().any(|n| n == u),
            }))),
            Check::Jwt(settings, keys) => match &p.jwt {
                None => Ok(Verdict::No),
                Some(jwt) => validate(jwt, settings, keys).await,
            },
        }
    }
}

/// What one method says about a request.
enum Verdict {
    /// It matches; for a JWT, with its issuer and subject.
    Yes(Option<String>),
    /// It does not (no key, another issuer, another address).
    No,
    /// A valid token of this caller's issuer, for a subject it does not cover.
    OtherSubject,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

#[derive(serde::Deserialize)]
struct Unverified {
    iss: Option<String>,
}

/// Validates `jwt` for this caller; a token verified before is taken from the cache.
async fn validate(jwt: &Jwt<'_>, settings: &JwtCaller, keys: &jwks::Jwks) -> Result<Verdict, Rejected> {
    if jwt.issuer.as_deref() != Some(settings.issuer.as_str()) {
        return Ok(Verdict::No);
    }
    let (token, digest) = (jwt.token, &jwt.digest);
    if let Some(known) = keys.verified(digest.as_ref()) {
        return Ok(match known {
            Some(key) => Verdict::Yes(Some(key)),
            None => Verdict::OtherSubject,
        });
    }
    // `alg` is read first on its own: `none` and unknown names are refused by name.
    let alg = segment(token, 0).and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
    let accepted = |a: &str| settings.algorithms.iter().any(|x| format!("{x:?}") == a);
    match alg {
        None => return Err(Rejected::Invalid("the token's header has no alg".into())),
        Some(a) if !accepted(&a) => {
            return Err(Rejected::Invalid(format!(
                "alg {:?} is not accepted",
                a.chars().filter(char::is_ascii_graphic).take(16).collect::<String>()
            )));
        }
        Some(_) => {}
    }
    let invalid = |m: &str| Rejected::Invalid(m.to_owned());
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| invalid("the token is not a well-formed JWT"))?;
    if !settings.algorithms.contains(&header.alg) {
        return Err(Rejected::Invalid(format!("alg {:?} is not accepted", header.alg)));
    }
    let candidates = keys.key(header.kid.as_deref()).await.map_err(|e| match e {
        jwks::KeyError::Unavailable(m) => Rejected::KeysUnavailable(m),
        jwks::KeyError::Unknown(m) => Rejected::Invalid(m),
    })?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&settings.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = settings.leeway.as_secs();
    let mut last = String::from("no key verifies the signature");
    for key in candidates.iter().filter(|k| k.alg.is_none_or(|a| a == header.alg)) {
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => {
                let sub = data.claims.sub;
                let covered = settings.subjects.is_empty()
                    || settings.subjects.iter().any(|p| crate::config::subject_matches(p, &sub));
                // A valid token of a subject this caller does not cover: perhaps another's.
                let key = covered.then(|| format!("{}\n{sub}", settings.issuer));
                keys.remember(digest.as_ref(), key.clone(), data.claims.exp);
                return Ok(match key {
                    Some(key) => Verdict::Yes(Some(key)),
                    None => Verdict::OtherSubject,
                });
            }
            Err(e) => last = reason(e.kind()),
        }
    }
    Err(Rejected::Invalid(last))
}

fn unverified_issuer(token: &str) -> Option<String> {
    serde_json::from_value::<Unverified>(segment(token, 1)?).ok()?.iss
}

/// A JWT's header (0) or payload (1), not verified.
fn segment(token: &str, index: usize) -> Option<serde_json::Value> {
    use base64::Engine;
    let part = token.split('.').nth(index)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn reason(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "the token is not for this audience".into(),
        ErrorKind::InvalidIssuer => "the token is from another issuer".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::InvalidAlgorithm => "the token's alg does not match its key".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        _ => "the token is not valid".into(),
    }
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject as RFC 4514 text, `CN=reports,O=acme`.
    pub subject: String,
    /// DNS names of the subject alternative name.
    pub dns: Vec<String>,
    /// URIs of the subject alternative name (SPIFFE IDs).
    pub uris: Vec<String>,
}

impl PeerCert {
    /// Reads a DER certificate (already verified by the TLS handshake).
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut peer = PeerCert { subject: rfc4514(cert.subject()), dns: Vec::new(), uris: Vec::new() };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => peer.dns.push(d.to_ascii_lowercase()),
                    GeneralName::URI(u) => peer.uris.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        Some(peer)
    }
}

/// A distinguished name as RFC 4514 writes it (most specific first), with the short names
/// operators use (`CN`, `O`, `OU`, `C`, `L`, `ST`, `DC`).
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for rdn in name.iter() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|a| {
                let oid = a.attr_type().to_id_string();
                let key = match oid.as_str() {
                    "2.5.4.3" => "CN",
                    "2.5.4.10" => "O",
                    "2.5.4.11" => "OU",
                    "2.5.4.6" => "C",
                    "2.5.4.7" => "L",
                    "2.5.4.8" => "ST",
                    "0.9.2342.19200300.100.1.25" => "DC",
                    _ => oid.as_str(),
                }
                .to_owned();
                let value = a.as_str().unwrap_or("?");
                format!("{key}={}", escape_dn(value))
            })
            .collect();
        parts.push(attrs.join("+"));
    }
    parts.reverse();
    parts.join(",")
}

fn escape_dn(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') || (i == 0 && matches!(c, '#' | ' ')) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_name_their_holder_as_rfc_4514_does() {
        let mut params =
            rcgen::CertificateParams::new(vec!["Reports.Internal".to_owned()]).unwrap_or_default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "acme, inc");
        params.distinguished_name.push(rcgen::DnType::CommonName, "reports");
        params
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://acme/ns/batch/sa/reports".try_into().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let peer = PeerCert::from_der(cert.der()).unwrap();
        assert_eq!(peer.subject, "CN=reports,O=acme\\, inc");
        assert_eq!(peer.dns, ["reports.internal"]);
        assert_eq!(peer.uris, ["spiffe://acme/ns/batch/sa/reports"]);
    }
}
