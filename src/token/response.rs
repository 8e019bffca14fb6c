//! Turning an IdP's answer into a token or an error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::error::{FetchError, tidy};
use super::jwt;
use crate::secret::Secret;

/// Longest access token taken. The largest real ones (Entra ID with group claims) stay under
/// 16 KiB, and upstreams refuse a header far shorter than an IdP response can be (nginx: 8 KiB
/// per line by default): a longer one would be sent on every request only to be refused.
pub const MAX_TOKEN_LEN: usize = 32 * 1024;

/// A token as issued, before it is scheduled.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The access token.
    pub access_token: Secret,
    /// How long it is valid from now.
    pub lifetime: Duration,
    /// Where the lifetime came from.
    pub lifetime_source: LifetimeSource,
    /// A refresh token, if one came back.
    pub refresh_token: Option<Secret>,
    /// Granted scope, as sent (order not meaningful).
    pub scope: Option<String>,
    /// The IdP's `Date` header, for the clock offset `check --live` reports.
    pub server_date: Option<std::time::SystemTime>,
    /// `token_type` as the reply stated it.
    pub token_type: Option<String>,
}

impl Issued {
    /// Refuses a `token_type` other than Bearer unless `any` (every route using the provider says
    /// in `inject` how to send it).
    pub fn check_token_type(&self, any: bool) -> Result<(), FetchError> {
        match &self.token_type {
            Some(t) if !any && !t.eq_ignore_ascii_case("bearer") => {
                Err(FetchError::UnsupportedTokenType(tidy(t)))
            }
            _ => Ok(()),
        }
    }
}

/// Which field the lifetime was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeSource {
    /// Relative seconds (`expires_in`).
    ExpiresIn,
    /// Absolute epoch seconds (`expires_at`).
    ExpiresAt,
    /// The access token's JWT `exp` claim.
    JwtExp,
    /// The provider's `default_ttl`.
    Default,
}

pub use crate::config::FieldMap;

fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k)).filter(|v| !v.is_null())
}

/// A JSON number or numeric string, as seconds.
fn seconds(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Parses a successful (2xx) token response body.
///
/// The lifetime is taken from `expires_in`, else `expires_at` (relative to the reply's `Date`, so
/// a skewed local clock does not matter), else the JWT `exp`, else `default_ttl`. A stated lifetime
/// of zero or less is treated as unknown, never as "forever".
pub fn parse_success(
    body: &[u8],
    map: &FieldMap,
    date: Option<SystemTime>,
    default_ttl: Duration,
) -> Result<Issued, FetchError> {
    let json: Value = serde_json::from_slice(body).map_err(|_| {
        let start = String::from_utf8_lossy(&body[..body.len().min(40)]).to_string();
        FetchError::Malformed(if start.trim_start().starts_with('<') {
            "the body is HTML, not JSON (a proxy or error page?)".into()
        } else {
            "the body is not JSON".into()
        })
    })?;
    if !json.is_object() {
        return Err(FetchError::Malformed("the body is not a JSON object".into()));
    }
    let access_token = match field(&json, &map.access_token) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(FetchError::Malformed(format!("`{}` is not a non-empty string", map.access_token)));
        }
        None => {
            return Err(FetchError::Malformed(format!("no `{}` in the response", map.access_token)));
        }
    };
    if access_token.len() > MAX_TOKEN_LEN {
        return Err(FetchError::Malformed(format!(
            "`{}` is {} bytes, more than the {MAX_TOKEN_LEN} an upstream request header can carry",
            map.access_token,
            access_token.len()
        )));
    }
    if access_token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(FetchError::Malformed(format!(
            "`{}` contains characters not allowed in a header",
            map.access_token
        )));
    }
    let token_type = map
        .token_type
        .as_deref()
        .and_then(|f| field(&json, f))
        .map(|t| t.as_str().unwrap_or_default().to_owned());
    let stated = |name: &Option<String>| -> Result<Option<f64>, FetchError> {
        match name.as_deref().and_then(|f| field(&json, f)) {
            None => Ok(None),
            Some(v) => seconds(v).map(Some).ok_or_else(|| {
                FetchError::Malformed(format!("`{}` is not a number", name.as_deref().unwrap_or_default()))
            }),
        }
    };
    let now = unix_now();
    let reference = date.and_then(|d| d.duration_since(UNIX_EPOCH).ok()).map_or(now, |d| d.as_secs_f64());
    let positive =
        |secs: f64| (secs.is_finite() && secs >= 1.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    let (lifetime, lifetime_source) = if let Some(l) = stated(&map.expires_in)?.and_then(positive) {
        (l, LifetimeSource::ExpiresIn)
    } else if let Some(l) = stated(&map.expires_at)?.and_then(|at| positive(at - reference)) {
        (l, LifetimeSource::ExpiresAt)
    } else {
        fallback_lifetime(&access_token, default_ttl)
    };
    let refresh_token = map
        .refresh_token
        .as_deref()
        .and_then(|f| field(&json, f))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(Secret::new);
    let scope = map.scope.as_deref().and_then(|f| field(&json, f)).and_then(Value::as_str).map(tidy);
    Ok(Issued {
        access_token: Secret::new(access_token),
        lifetime,
        lifetime_source,
        refresh_token,
        scope,
        server_date: date,
        token_type,
    })
}

/// The lifetime of a token whose response states none: its JWT `exp`, else `default_ttl`.
pub fn fallback_lifetime(access_token: &str, default_ttl: Duration) -> (Duration, LifetimeSource) {
    let remaining = jwt::expiry(access_token).map(|exp| exp - unix_now());
    match remaining {
        Some(secs) if secs.is_finite() && secs >= 1.0 => {
            (Duration::from_secs_f64(secs.min(1e9)), LifetimeSource::JwtExp)
        }
        _ => (default_ttl, LifetimeSource::Default),
    }
}

/// Parses a non-2xx answer: RFC 6749 §5.2 `{"error","error_description"}` or Screening Eagle's
/// `{"error","errorDescription"}`; anything else becomes a bare status error. The text is kept
/// whole: [`FetchError::redact`] removes echoed secrets and only then bounds it (cutting first
/// could leave most of a secret behind).
pub fn parse_error(status: u16, body: &[u8], retry_after: Option<Duration>) -> FetchError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let error = json.as_ref().and_then(|j| j.get("error")).and_then(Value::as_str);
    match error {
        Some(error) => {
            let description = json
                .as_ref()
                .and_then(|j| j.get("error_description").or_else(|| j.get("errorDescription")))
                .and_then(Value::as_str)
                .map(str::to_owned);
            FetchError::Idp { status, error: error.to_owned(), description, retry_after }
        }
        None => FetchError::Status { status, retry_after },
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(v).ok()?.duration_since(SystemTime::now()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    fn ok(body: &str) -> Result<Issued, FetchError> {
        let issued = parse_success(body.as_bytes(), &FieldMap::oauth2(), None, TTL)?;
        issued.check_token_type(false).map(|()| issued)
    }

    #[test]
    fn corti_keycloak_reply_with_extra_fields() {
        let t = ok(r#"{"access_token":"ey.x","expires_in":300,"refresh_expires_in":0,"token_type":"Bearer","id_token":"e","not-before-policy":0,"scope":"openid email profile"}"#).unwrap();
        assert_eq!(t.access_token.expose(), "ey.x");
        assert_eq!(t.lifetime, Duration::from_secs(300));
        assert!(t.refresh_token.is_none());
    }

    #[test]
    fn screening_eagle_reply_with_id_and_refresh_tokens() {
        let t = ok(r#"{"scope":"openid email profile inspect","token_type":"Bearer","access_token":"eyJ.a.b","expires_in":604800,"id_token":"eyJ.c.d","refresh_token":"eyJ.e.f"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(604_800));
        assert_eq!(t.refresh_token.unwrap().expose(), "eyJ.e.f");
        assert_eq!(t.scope.as_deref(), Some("openid email profile inspect"));
    }

    #[test]
    fn tokens_longer_than_a_header_can_carry_are_refused() {
        let reply = |n: usize| format!(r#"{{"access_token":"{}","expires_in":60}}"#, "a".repeat(n));
        assert_eq!(ok(&reply(MAX_TOKEN_LEN)).unwrap().access_token.expose().len(), MAX_TOKEN_LEN);
        let err = ok(&reply(MAX_TOKEN_LEN + 1)).unwrap_err().to_string();
        assert!(err.contains("32769 bytes"), "{err}");
    }

    #[test]
    fn expires_in_as_string_and_lowercase_bearer() {
        let t = ok(r#"{"access_token":"a","expires_in":"3600","token_type":"bearer"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(3600));
        assert_eq!(t.lifetime_source, LifetimeSource::ExpiresIn);
    }

    #[test]
    fn missing_or_zero_expiry_falls_back_to_default_never_forever() {
        assert_eq!(ok(r#"{"access_token":"a"}"#).unwrap().lifetime, TTL);
        let t = ok(r#"{"access_token":"a","expires_in":0}"#).unwrap();
        assert_eq!((t.lifetime, t.lifetime_source), (TTL, LifetimeSource::Default));
    }

    #[test]
    fn rejects_unusable_responses() {
        assert!(matches!(ok(r#"{"token_type":"Bearer"}"#), Err(FetchError::Malformed(_))));
        assert!(matches!(ok("<html>oops</html>"), Err(FetchError::Malformed(m)) if m.contains("HTML")));
        assert!(matches!(
            ok(r#"{"access_token":"a","token_type":"mac"}"#),
            Err(FetchError::UnsupportedTokenType(_))
        ));
        assert!(matches!(ok(r#"{"access_token":"a b"}"#), Err(FetchError::Malformed(_))));
        let stated =
            parse_success(br#"{"access_token":"a","token_type":"mac"}"#, &FieldMap::oauth2(), None, TTL);
        assert!(stated.unwrap().check_token_type(true).is_ok(), "routes say how to send it");
        assert!(matches!(ok(r#"{"access_token":"a","expires_in":"soon"}"#), Err(FetchError::Malformed(_))));
    }

    #[test]
    fn both_error_shapes_are_understood() {
        let e = parse_error(
            401,
            br#"{"error":"unauthorized_client","error_description":"Invalid client"}"#,
            None,
        );
        assert_eq!(
            e.to_string(),
            "the identity provider refused: HTTP 401, error \"unauthorized_client\": Invalid client"
        );
        let e = parse_error(403, br#"{"error":"Forbidden","errorDescription":"permission denied"}"#, None);
        assert_eq!(
            e.to_string(),
            "the identity provider refused: HTTP 403, error \"Forbidden\": permission denied"
        );
        assert!(matches!(parse_error(502, b"<html>", None), FetchError::Status { status: 502, .. }));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after(Some("7")), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(Some("garbage")), None);
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        assert!(retry_after(Some(&later)).unwrap() > Duration::from_secs(100));
    }
}
