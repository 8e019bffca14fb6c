//! Where a route puts the credential: a header, with a scheme (`Authorization: Bearer …`,
//! `Authorization: Key …`) or raw (`X-Api-Key: …`), or a query parameter (Corti's streams take
//! `token=Bearer%20…`).

use http::HeaderName;
use serde::Deserialize;

use super::value::Text;

/// Where and how the credential goes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawInject")]
pub enum Inject {
    /// In a header: `<scheme> <token>`, or the token alone without a scheme.
    Header {
        /// The header.
        name: HeaderName,
        /// The scheme before the token.
        scheme: Option<String>,
    },
    /// In a query parameter, replacing any value the client sent for it.
    Query {
        /// The parameter name.
        param: String,
        /// The scheme before the token.
        scheme: Option<String>,
    },
}

impl Default for Inject {
    fn default() -> Self {
        Inject::Header { name: http::header::AUTHORIZATION, scheme: Some("Bearer".into()) }
    }
}

impl Inject {
    /// `Authorization: Bearer`, whose header value each token carries ready-made. Asked on every
    /// request: compares without building the default.
    pub fn is_default(&self) -> bool {
        matches!(self, Inject::Header { name, scheme: Some(s) } if name == http::header::AUTHORIZATION && s == "Bearer")
    }

    /// The value sent for `token`.
    pub fn value(&self, token: &str) -> String {
        let (Inject::Header { scheme, .. } | Inject::Query { scheme, .. }) = self;
        match scheme {
            Some(s) => format!("{s} {token}"),
            None => token.to_owned(),
        }
    }
}

/// Headers a credential may not go in besides the hop-by-hop ones: the message's framing and
/// routing, and the proxy's own credentials.
const RESERVED: [&str; 4] = ["host", "content-length", "proxy-authorization", "proxy-authenticate"];

/// `inject:` as written.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawInject {
    /// The header that carries the credential.
    header: Option<Text>,
    /// The query parameter that carries it (and is never logged).
    query: Option<Text>,
    /// A word before the credential (`Bearer`, `Key`); none: the credential alone.
    scheme: Option<Text>,
}

impl TryFrom<RawInject> for Inject {
    type Error = String;
    fn try_from(raw: RawInject) -> Result<Inject, String> {
        let RawInject { header, query, scheme } = raw;
        parse(header.map(|t| t.0), query.map(|t| t.0), scheme.map(|t| t.0))
    }
}

fn parse(header: Option<String>, query: Option<String>, scheme: Option<String>) -> Result<Inject, String> {
    if let Some(s) = &scheme
        && (s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)))
    {
        return Err(format!("scheme {s:?}: one word, like Bearer or Key"));
    }
    match (header, query) {
        (Some(h), None) => {
            let name =
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("{h:?} is not a header name"))?;
            if RESERVED.contains(&name.as_str()) || super::provider::HOP_BY_HOP.contains(&name.as_str()) {
                return Err(format!("the credential cannot go in {h}: it frames or routes the request"));
            }
            Ok(Inject::Header { name, scheme })
        }
        (None, Some(q)) => {
            if q.is_empty() || !q.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                return Err(format!("query parameter {q:?}: letters, digits and - . _ ~ only"));
            }
            Ok(Inject::Query { param: q, scheme })
        }
        (Some(_), Some(_)) => Err("inject takes header or query, not both".into()),
        (None, None) => {
            Err("inject needs header (e.g. { header: X-Api-Key }) or query (e.g. { query: token })".into())
        }
    }
}

super::json_schema::schema_as!(Inject => RawInject);

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(yaml: &str) -> Result<Inject, String> {
        serde_norway::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn headers_queries_and_schemes() {
        assert_eq!(
            inject("{ header: X-Api-Key }"),
            Ok(Inject::Header { name: HeaderName::from_static("x-api-key"), scheme: None })
        );
        let key = inject("{ header: Authorization, scheme: Key }").unwrap_or_default();
        assert_eq!(key.value("abc"), "Key abc");
        let query = inject("{ query: token, scheme: Bearer }").unwrap_or_default();
        assert_eq!(query, Inject::Query { param: "token".into(), scheme: Some("Bearer".into()) });
        assert!(Inject::default().is_default() && !key.is_default());
        for bad in [
            "{ header: Host }",
            "{ header: Transfer-Encoding }",
            "{ header: \"bad name\" }",
            "{ query: \"a b\" }",
            "{ header: X, query: y }",
            "{ scheme: Bearer }",
            "{ header: X, scheme: \"two words\" }",
            "{ header: X, other: 1 }",
        ] {
            assert!(inject(bad).is_err(), "{bad}");
        }
    }
}
