//! A string that must never be printed: client secrets, passwords, API keys, access and refresh tokens.

use std::fmt;
use std::sync::Arc;

/// `base64(user:password)`, the credentials of a `Basic` authorization (RFC 7617).
pub fn basic_credentials(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// Holds a secret value. `Debug` and `Display` print `***`; reading the value takes an explicit
/// [`Secret::expose`] call, so leaking one into a log takes deliberate code.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself, for building a request. Never log what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is empty (an unset secret, usually a configuration mistake).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Longest text a remote party chose (an IdP's error description) that tokengate repeats in a
/// log line, a status page or an error.
pub const MAX_REMOTE_TEXT: usize = 200;

/// Removes secret values from text a remote party chose before it is logged or shown: an IdP
/// that echoes the request in its error text would otherwise put the client secret, password or
/// refresh token into the log and `/readyz`. Each value is also looked for in the spellings it
/// had on the wire (form-encoded, JSON-escaped, inside a Basic credential).
#[derive(Default)]
pub struct Redactor {
    needles: Vec<String>,
}

impl Redactor {
    /// Adds a secret value.
    pub fn add(&mut self, value: &str) {
        if value.is_empty() {
            return;
        }
        let form: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
        let json = serde_json::to_string(value).unwrap_or_default();
        let json = json.trim_matches('"').to_owned();
        for needle in [value.to_owned(), form, json] {
            if !needle.is_empty() && !self.needles.contains(&needle) {
                self.needles.push(needle);
            }
        }
        // Longest first, so a secret that contains another is removed whole.
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    /// Adds the credential of an `Authorization` value (`Basic xyz`, `Bearer xyz`) and, for
    /// Basic, the decoded `id:secret` pair's secret.
    pub fn add_authorization(&mut self, header: &str) {
        use base64::Engine;
        let credential = header.split_once(' ').map_or(header, |(_, c)| c.trim());
        self.add(credential);
        if let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(credential)
            && let Ok(pair) = String::from_utf8(pair)
            && let Some((_, secret)) = pair.split_once(':')
        {
            self.add(secret);
        }
    }

    /// `text` with every secret replaced by `***`, control characters removed, and at most
    /// [`MAX_REMOTE_TEXT`] characters long.
    pub fn clean(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = replace_secret(&out, needle);
            }
        }
        let mut chars = out.chars().filter(|c| !c.is_control());
        let mut bounded: String = chars.by_ref().take(MAX_REMOTE_TEXT).collect();
        if chars.next().is_some() {
            bounded.push_str("...");
        }
        bounded
    }
}

/// Secrets shorter than this are replaced only where they stand alone (not inside a word), so a
/// short test secret such as `ss` does not turn `permission` into `permi***ion`.
const WHOLE_WORD_BELOW: usize = 8;

fn replace_secret(text: &str, needle: &str) -> String {
    if needle.len() >= WHOLE_WORD_BELOW {
        return text.replace(needle, "***");
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(needle) {
        out.push_str(&rest[..at]);
        let before = out.chars().next_back();
        let after = rest[at + needle.len()..].chars().next();
        if word(before) || word(after) {
            out.push_str(needle);
        } else {
            out.push_str("***");
        }
        rest = &rest[at + needle.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_covers_wire_spellings_and_bounds_length() {
        let mut r = Redactor::default();
        r.add("p&ss w\"rd");
        r.add_authorization("Basic Y2xpZW50LTE6czNjcjN0LXZhbHVl"); // client-1:s3cr3t-value
        let text = "bad password p&ss w\"rd, p%26ss+w%22rd, p&ss w\\\"rd; got Basic Y2xpZW50LTE6czNjcjN0LXZhbHVl for s3cr3t-value";
        let clean = r.clean(text);
        assert!(!clean.contains("p&ss") && !clean.contains("p%26ss") && !clean.contains("s3cr3t"), "{clean}");
        assert!(!clean.contains("Y2xpZW50"), "{clean}");
        assert!(clean.starts_with("bad password ***"), "{clean}");
        let mut short = Redactor::default();
        short.add("ss");
        assert_eq!(short.clean("permission: ss, (ss) ss"), "permission: ***, (***) ***");
        let long = r.clean(&"x\n".repeat(500));
        assert_eq!(long, format!("{}...", "x".repeat(MAX_REMOTE_TEXT)));
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }
}
