//! Named callers (`callers:`): who is sending a request, told by an API key, a validated JWT or a
//! source address block. Routes name the callers they serve and may pick a provider per caller.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use super::access::Cidr;
use super::value::{self, Text};
use crate::secret::Secret;

/// The callers, in the order the file lists them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Callers(pub Vec<(String, Caller)>);

impl Callers {
    /// The caller named `name`.
    pub fn get(&self, name: &str) -> Option<&Caller> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Whether any caller is defined.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Callers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = Callers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of caller names to how each is recognised")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Callers, A::Error> {
                let mut out: Vec<(String, Caller)> = Vec::new();
                while let Some((name, caller)) = map.next_entry::<String, Caller>()? {
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!("caller {name:?} is defined twice")));
                    }
                    out.push((name, caller));
                }
                Ok(Callers(out))
            }
        }
        d.deserialize_map(InOrder)
    }
}

/// How one caller is recognised: by any of its methods, tried in the order written, or by all of
/// those `require` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The methods, in the order written.
    pub methods: Vec<Method>,
    /// Every one of these must match (empty: any one does).
    pub require: Vec<MethodKind>,
}

/// One way to recognise a caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// An API key from a file (one per line), sent in the API key header.
    ApiKeys {
        /// The file, watched: a changed file reloads the configuration.
        file: PathBuf,
        /// Its keys.
        keys: Vec<Secret>,
    },
    /// A JWT in `Authorization: Bearer`, validated.
    Jwt(Box<JwtCaller>),
    /// A client certificate verified by the TLS listener.
    ClientCert(CertMatch),
    /// The source address.
    Allow(Vec<Cidr>),
}

impl Method {
    /// The method's kind, as `require` names it.
    pub fn kind(&self) -> MethodKind {
        match self {
            Method::ApiKeys { .. } => MethodKind::ApiKeys,
            Method::Jwt(_) => MethodKind::Jwt,
            Method::ClientCert(_) => MethodKind::ClientCert,
            Method::Allow(_) => MethodKind::Allow,
        }
    }
}

/// Which certificates are the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertMatch {
    /// The subject, as RFC 4514 text (`CN=reports,O=acme`), compared exactly.
    Subject(String),
    /// A DNS name in the subject alternative name.
    SanDns(String),
    /// A URI in the subject alternative name (a SPIFFE ID).
    SanUri(String),
}

/// A kind of method, as `require` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    /// `api_keys_file`.
    #[serde(alias = "api_key")]
    ApiKeys,
    /// `jwt`.
    Jwt,
    /// `client_cert`.
    ClientCert,
    /// `allow`.
    Allow,
}

/// Where the keys that sign a caller's JWTs come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    /// A JWKS URL.
    Uri(url::Url),
    /// The `jwks_uri` of the issuer's OpenID configuration.
    Discovery,
    /// A local JWKS file, re-read when it changes.
    File(PathBuf),
}

/// JWT validation settings: Kubernetes service-account tokens or any OIDC issuer's.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtCaller {
    /// `iss` must equal this.
    pub issuer: String,
    /// The signing keys.
    pub jwks: JwksSource,
    /// A CA bundle trusted for the JWKS and discovery URLs besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// `sub` must match one of these (`*` matches any run of characters); empty: any.
    pub subjects: Vec<String>,
    /// Accepted `alg` values; asymmetric only.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// `sub` against a pattern where `*` matches any run of characters.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = subject.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    api_keys_file: Option<Text>,
    jwt: Option<RawJwt>,
    client_cert: Option<RawCert>,
    allow: Option<Vec<Cidr>>,
    #[serde(default)]
    require: Vec<MethodKind>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawCert {
    subject: Option<Text>,
    san_dns: Option<Text>,
    san_uri: Option<Text>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    issuer: Text,
    jwks_uri: Option<Text>,
    jwks_file: Option<Text>,
    ca_file: Option<Text>,
    #[serde(default)]
    audiences: Vec<Text>,
    #[serde(default)]
    subjects: Vec<Text>,
    #[serde(default)]
    algorithms: Vec<Text>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    leeway: Option<Duration>,
}

/// What `algorithms` may name: signatures with a public key. HMAC would let anyone holding the
/// verification key sign.
const ASYMMETRIC: [jsonwebtoken::Algorithm; 8] = {
    use jsonwebtoken::Algorithm::*;
    [RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384]
};

impl schemars::JsonSchema for Callers {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Callers".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let caller = generator.subschema_for::<RawCaller>();
        schemars::json_schema!({ "type": "object", "additionalProperties": caller })
    }
}

super::json_schema::schema_as!(Caller => RawCaller);

impl<'de> Deserialize<'de> for Caller {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawCaller::deserialize(d)?;
        build(raw).map_err(serde::de::Error::custom)
    }
}

fn build(raw: RawCaller) -> Result<Caller, String> {
    let RawCaller { api_keys_file, jwt, client_cert, allow, require } = raw;
    let mut methods = Vec::new();
    if let Some(file) = api_keys_file {
        let text = super::provider::secret("api_keys", None, Some(file.clone()))?.unwrap_or(Secret::new(""));
        let keys = super::access::key_lines(&text);
        if !super::access::long_enough(&keys) {
            return Err(format!(
                "api_keys_file {:?}: keys must be at least {} characters",
                file.0,
                super::access::MIN_KEY_LEN
            ));
        }
        methods.push(Method::ApiKeys { file: PathBuf::from(file.0), keys });
    }
    if let Some(j) = jwt {
        methods.push(Method::Jwt(Box::new(jwt_caller(j)?)));
    }
    if let Some(c) = client_cert {
        let m = match (c.subject, c.san_dns, c.san_uri) {
            (Some(s), None, None) => CertMatch::Subject(s.0),
            (None, Some(d), None) => CertMatch::SanDns(d.0.to_ascii_lowercase()),
            (None, None, Some(u)) => CertMatch::SanUri(u.0),
            _ => return Err("client_cert: name exactly one of subject, san_dns or san_uri".into()),
        };
        methods.push(Method::ClientCert(m));
    }
    if let Some(blocks) = allow {
        if blocks.is_empty() {
            return Err("allow needs at least one address block".into());
        }
        methods.push(Method::Allow(blocks));
    }
    if methods.is_empty() {
        return Err("a caller needs api_keys_file, jwt, client_cert or allow".into());
    }
    if let Some(missing) = require.iter().find(|k| !methods.iter().any(|m| m.kind() == **k)) {
        return Err(format!("require lists {missing:?}, which this caller does not configure"));
    }
    Ok(Caller { methods, require })
}

fn jwt_caller(raw: RawJwt) -> Result<JwtCaller, String> {
    let RawJwt { issuer, jwks_uri, jwks_file, ca_file, audiences, subjects, algorithms, leeway } = raw;
    let jwks = match (jwks_uri, jwks_file) {
        (Some(_), Some(_)) => return Err("jwt: set jwks_uri or jwks_file, not both".into()),
        (Some(u), None) => {
            let url = url::Url::parse(&u.0).map_err(|e| format!("jwt.jwks_uri {:?}: {e}", u.0))?;
            if url.scheme() != "https" && !super::provider::is_loopback(&url) {
                return Err(format!("jwt.jwks_uri {:?} must be https", u.0));
            }
            JwksSource::Uri(url)
        }
        (None, Some(f)) => {
            super::files::record(&f.0);
            JwksSource::File(PathBuf::from(f.0))
        }
        (None, None) => JwksSource::Discovery,
    };
    if audiences.is_empty() {
        return Err(
            "jwt.audiences: name at least one audience (tokens for other services must not pass)".into()
        );
    }
    let algorithms = if algorithms.is_empty() {
        vec![jsonwebtoken::Algorithm::RS256, jsonwebtoken::Algorithm::ES256, jsonwebtoken::Algorithm::PS256]
    } else {
        algorithms
            .iter()
            .map(|a| {
                a.0.parse::<jsonwebtoken::Algorithm>().ok().filter(|alg| ASYMMETRIC.contains(alg)).ok_or_else(
                    || {
                        format!(
                            "jwt.algorithms: {:?} is not one of RS256..512, PS256..512, ES256, ES384",
                            a.0
                        )
                    },
                )
            })
            .collect::<Result<_, _>>()?
    };
    Ok(JwtCaller {
        issuer: issuer.0,
        jwks,
        ca_file: ca_file.map(|t| {
            super::files::record(&t.0);
            PathBuf::from(t.0)
        }),
        audiences: audiences.into_iter().map(|t| t.0).collect(),
        subjects: subjects.into_iter().map(|t| t.0).collect(),
        algorithms,
        leeway: leeway.unwrap_or(Duration::from_secs(30)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns() {
        let m = subject_matches;
        assert!(m("system:serviceaccount:batch:*", "system:serviceaccount:batch:runner"));
        assert!(!m("system:serviceaccount:batch:*", "system:serviceaccount:other:runner"));
        assert!(m("*", "anything") && m("a*c", "abbc") && m("a*b*c", "axbyc") && m("exact", "exact"));
        assert!(!m("exact", "exactly") && !m("a*c", "ab") && !m("ab*ba", "aba"));
    }
}
