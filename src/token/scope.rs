//! Whether the IdP granted the scopes a provider asked for. Many IdPs silently drop a scope the
//! client may not have, and the token then fails at the API, far from the cause.

/// What the reply (or the token's own claims) says about the requested scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    /// No scope was requested.
    NoneRequested,
    /// Every requested scope is in the granted ones.
    All(String),
    /// Some requested scopes are not in the granted ones.
    Missing {
        /// What was granted.
        granted: String,
        /// Requested and not granted.
        missing: Vec<String>,
    },
    /// Neither the reply nor a JWT's `scope`/`scp` says what was granted.
    Unconfirmed,
}

/// Compares `requested` with the reply's `scope`, or else the token's `scope` or `scp` claim.
pub fn granted(requested: &[String], stated: Option<&str>, token: &str) -> Granted {
    if requested.is_empty() {
        return Granted::NoneRequested;
    }
    let from_claims = || {
        let claims = super::jwt::claims(token)?;
        match claims.get("scope").or_else(|| claims.get("scp"))? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => {
                Some(a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" "))
            }
            _ => None,
        }
    };
    let Some(granted) = stated.map(str::to_owned).or_else(from_claims) else {
        return Granted::Unconfirmed;
    };
    let have: Vec<&str> = granted.split_whitespace().collect();
    let missing: Vec<String> = requested.iter().filter(|r| !have.contains(&r.as_str())).cloned().collect();
    if missing.is_empty() { Granted::All(granted) } else { Granted::Missing { granted, missing } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn requested_scopes_are_checked_against_the_reply_then_the_jwt() {
        assert_eq!(granted(&[], None, "t"), Granted::NoneRequested);
        assert_eq!(granted(&s(&["a", "b"]), Some("b a c"), "t"), Granted::All("b a c".into()));
        assert_eq!(
            granted(&s(&["a", "write"]), Some("a"), "t"),
            Granted::Missing { granted: "a".into(), missing: s(&["write"]) }
        );
        assert_eq!(granted(&s(&["a"]), None, "opaque"), Granted::Unconfirmed);
        // {"scp":["a","b"]}
        let jwt = "e30.eyJzY3AiOlsiYSIsImIiXX0.x";
        assert_eq!(granted(&s(&["b"]), None, jwt), Granted::All("a b".into()));
    }
}
