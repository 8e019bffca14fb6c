//! Reading (not verifying) JWT claims: the `exp` fallback and `tokengate token` output.

use base64::Engine;

/// The claims of a JWT, decoded without verifying the signature; `None` if `token` is not a JWT.
pub fn claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// The `exp` claim (seconds since the epoch) of a JWT.
pub fn expiry(token: &str) -> Option<f64> {
    claims(token)?.get("exp")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The access token from the Screening Eagle ID document: exp 1716466218, iat 1715861418.
    const SE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJpbnRlZ3JhdGlvbi1kZXYtVk5aUXFEdDRIdiIsImV4cCI6MTcxNjQ2NjIxOCwianRpIjoiYjc4N2FiMTUtNDgxNS00MTFmLTkzYjctYzc5YWIxNWYwZDg3IiwiaWF0IjoxNzE1ODYxNDE4LCJpc3MiOiJTY3JlZW5pbmcgRWFnbGUgSUQiLCJzdWIiOiIxMzAyIiwic2NwIjoib3BlbmlkIGVtYWlsIHByb2ZpbGUgaW5zcGVjdCIsInNjb3BlcyI6WyJ1c2VyIl0sInVzZXJJRCI6MTMwMiwidXNlclJlZ2lvbiI6IlNHIn0.zsN5ys3qdmcJmJwzZHR9c9LC92KPTh2-NaliF2eSHFc";

    #[test]
    fn reads_exp_from_a_real_sample() {
        assert_eq!(expiry(SE), Some(1_716_466_218.0));
        let c = claims(SE).unwrap();
        assert_eq!(c["iat"].as_f64().unwrap() + 604_800.0, 1_716_466_218.0);
    }

    #[test]
    fn opaque_tokens_have_no_claims() {
        assert!(claims("opaque-token").is_none());
        assert!(claims("a.b.c").is_none());
        assert!(claims("a.b.c.d").is_none());
    }
}
