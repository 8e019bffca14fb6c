//! Why a token could not be obtained.

use std::borrow::Cow;
use std::time::Duration;

/// A failed token fetch. Messages carry the IdP's error code and description, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// OIDC discovery failed.
    #[error("OIDC discovery failed: {0}")]
    Discovery(String),
    /// No answer within the provider's timeout.
    #[error("the token endpoint did not answer in time")]
    Timeout,
    /// TCP/TLS connection to the token endpoint failed.
    #[error("cannot reach the token endpoint: {0}")]
    Network(String),
    /// The egress proxy refused or could not open the way to the token endpoint.
    #[error("egress proxy {0}")]
    EgressProxy(String),
    /// The IdP answered with an OAuth2-style error body.
    #[error("the identity provider refused: HTTP {status}, error {error:?}{}", description.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Idp {
        /// HTTP status.
        status: u16,
        /// The `error` code.
        error: String,
        /// `error_description` or `errorDescription`.
        description: Option<String>,
        /// From a `Retry-After` header on 429/503.
        retry_after: Option<Duration>,
    },
    /// Non-success status without a recognisable error body (an HTML error page, say).
    #[error("the identity provider answered HTTP {status} without an OAuth2 error body")]
    Status {
        /// HTTP status.
        status: u16,
        /// From a `Retry-After` header on 429/503.
        retry_after: Option<Duration>,
    },
    /// A success status with a body that is not a usable token response.
    #[error("malformed token response: {0}")]
    Malformed(String),
    /// `token_type` is something other than Bearer.
    #[error(
        "unsupported token_type {0:?}: sent as `Authorization: Bearer` it would not be the credential the IdP issued; say how to send it with `inject` on every route using this provider"
    )]
    UnsupportedTokenType(String),
    /// A key, certificate, assertion or exchange token file cannot be used.
    #[error("{0}")]
    Credential(String),
    /// Local problem, such as an unwritable state file.
    #[error("{0}")]
    Local(String),
}

impl FetchError {
    /// Short label for the `result` metric label; bounded and free of secrets.
    pub fn label(&self) -> Cow<'static, str> {
        match self {
            FetchError::Discovery(_) => "discovery_error".into(),
            FetchError::Timeout => "timeout".into(),
            FetchError::Network(_) => "network_error".into(),
            FetchError::EgressProxy(_) => "egress_proxy_error".into(),
            FetchError::Idp { error, .. } => sanitize_code(error).into(),
            FetchError::Status { status, .. } => format!("http_{status}").into(),
            FetchError::Malformed(_) => "malformed_response".into(),
            FetchError::UnsupportedTokenType(_) => "unsupported_token_type".into(),
            FetchError::Credential(_) => "credential_error".into(),
            FetchError::Local(_) => "local_error".into(),
        }
    }

    /// Server-side or network trouble that a retry may cure; anything else is usually a
    /// configuration problem (wrong secret, scope not allowed).
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Timeout
            | FetchError::Network(_)
            | FetchError::EgressProxy(_)
            | FetchError::Discovery(_) => true,
            FetchError::Idp { status, .. } | FetchError::Status { status, .. } => {
                *status >= 500 || *status == 429
            }
            FetchError::Malformed(_)
            | FetchError::UnsupportedTokenType(_)
            | FetchError::Credential(_)
            | FetchError::Local(_) => false,
        }
    }

    /// The server's requested delay, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Idp { retry_after, .. } | FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The error with every text field passed through `redactor`: secrets the IdP echoed are
    /// removed and IdP-chosen text is bounded.
    pub fn redact(self, redactor: &crate::secret::Redactor) -> Self {
        let clean = |s: String| redactor.clean(&s);
        match self {
            FetchError::Discovery(s) => FetchError::Discovery(clean(s)),
            FetchError::Network(s) => FetchError::Network(clean(s)),
            FetchError::EgressProxy(s) => FetchError::EgressProxy(clean(s)),
            FetchError::Idp { status, error, description, retry_after } => FetchError::Idp {
                status,
                error: clean(error),
                description: description.map(clean),
                retry_after,
            },
            FetchError::Malformed(s) => FetchError::Malformed(clean(s)),
            FetchError::UnsupportedTokenType(s) => FetchError::UnsupportedTokenType(clean(s)),
            FetchError::Local(s) => FetchError::Local(clean(s)),
            FetchError::Credential(s) => FetchError::Credential(clean(s)),
            e @ (FetchError::Timeout | FetchError::Status { .. }) => e,
        }
    }

    /// True for an OAuth2 `invalid_grant` (a refresh token that is expired, revoked or used).
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, FetchError::Idp { error, .. } if error == "invalid_grant")
    }
}

/// Turns an IdP-chosen error code into a metric label: lower-case `[a-z0-9_]`, at most 40 chars.
fn sanitize_code(code: &str) -> String {
    let mut out: String = code
        .chars()
        .take(40)
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    if out.is_empty() {
        out.push_str("idp_error");
    }
    out
}

/// Trims text the IdP sent before it is logged: bounded length, no control characters.
pub fn tidy(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_safe() {
        let e =
            FetchError::Idp { status: 400, error: "Forbidden".into(), description: None, retry_after: None };
        assert_eq!(e.label(), "forbidden");
        let e = FetchError::Idp {
            status: 400,
            error: "a b\"}\n".repeat(20),
            description: None,
            retry_after: None,
        };
        assert!(e.label().len() <= 40 && e.label().chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert_eq!(FetchError::Status { status: 503, retry_after: None }.label(), "http_503");
    }
}
