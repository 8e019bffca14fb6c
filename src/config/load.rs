//! Reading a configuration file: the text, `${VAR}`s, deserialization, and errors placed at the
//! line and column of the offending key.

use std::net::SocketAddr;
use std::path::Path;

use super::locate::{Place, Spans};
use super::*;

/// Loads a configuration file, expanding `${VAR}` from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    use std::fmt::Write;
    let text = source::read(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let overrides = LISTENERS.get().copied().unwrap_or_default();
    let mut config = parse_with(&text, &path.display().to_string(), overrides)?;
    let sha = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    config.digest = Some(sha.as_ref()[..6].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }));
    Ok(config)
}

/// Listener addresses given on the command line (`run --listen`, `--admin-listen`) or as
/// `TOKENGATE_LISTEN` / `TOKENGATE_ADMIN_LISTEN`, which win over the file's at every load, so a
/// container can bind `0.0.0.0` with a file written for loopback, and a reload keeps them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListenerOverrides {
    /// The proxy listener.
    pub listen: Option<SocketAddr>,
    /// The admin listener.
    pub admin: Option<SocketAddr>,
}

static LISTENERS: std::sync::OnceLock<ListenerOverrides> = std::sync::OnceLock::new();

/// Sets the listener overrides for every later [`load`] in this process (once, at start).
pub fn override_listeners(overrides: ListenerOverrides) {
    let _ = LISTENERS.set(overrides);
}

/// Keys whose values are secrets when written inline.
const SECRET_KEYS: [&str; 5] = ["client_secret", "password", "refresh_token", "api_key", "keys"];

/// A warning when the file holds inline secrets (not `${VAR}` or `_file` references) and can be
/// read by group or others.
pub fn permission_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o044 == 0 {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let inline = text.lines().enumerate().find(|(_, line)| {
            let line = line.trim_start().trim_start_matches("- ");
            SECRET_KEYS.iter().any(|k| {
                line.strip_prefix(k).and_then(|rest| rest.trim_start().strip_prefix(':')).is_some_and(|v| {
                    let v = v.trim().trim_matches(['"', '\'']);
                    !v.is_empty() && !v.starts_with("${") && !v.starts_with('#')
                })
            })
        })?;
        Some(format!(
            "{}:{}: the file holds an inline secret and is readable by group or others (mode {:o}); use ${{VAR}} or a _file key, or chmod 600",
            path.display(),
            inline.0 + 1,
            mode & 0o777
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Parses configuration text; `path` is only used in error messages.
pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
    parse_with(text, path, ListenerOverrides::default())
}

/// [`parse`] with the command line's listener addresses in place of the file's, applied before
/// the checks, so a clash they make is refused like one written in the file.
fn parse_with(text: &str, path: &str, overrides: ListenerOverrides) -> Result<Config, ConfigError> {
    if let Some(line) = source::too_deep(text) {
        let message = format!("'[' and '{{' nest more than {} levels deep here", source::MAX_DEPTH);
        let place = Some(Place { line, column: 1 });
        return Err(ConfigError::invalid(path, place, "structure".into(), message));
    }
    let missing = env::missing(text);
    if !missing.is_empty() {
        return Err(ConfigError::MissingEnv { path: path.to_owned(), missing });
    }
    // The structure first, with every key's place; then the values, into the config types.
    let spans =
        Spans::of(text).map_err(|e| ConfigError::invalid(path, Some(e.place), "yaml".into(), e.message))?;
    let de = serde_norway::Deserializer::from_str(text);
    let (parsed, read) = files::collect(|| serde_path_to_error::deserialize::<_, Config>(de));
    let mut config = parsed.map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = bare_message(&inner.to_string(), &key);
        let serde = inner.location().map(|l| Place { line: l.line(), column: l.column() });
        let (place, message) = place_error(&spans, &key, message);
        ConfigError::invalid(path, place.or(serde), key, message)
    })?;
    config.listen = overrides.listen.unwrap_or(config.listen);
    config.admin.listen = overrides.admin.unwrap_or(config.admin.listen);
    validate::check(&mut config).map_err(|(key, message)| {
        let place = spans.value(&key);
        ConfigError::invalid(path, place, key, message)
    })?;
    config.files = validate::named_files(&config, read);
    Ok(config)
}

/// serde_norway's message without its own key prefix and position suffix, which the caller
/// reports in a uniform way.
fn bare_message(message: &str, key: &str) -> String {
    let mut m = message;
    if let Some(i) = m.rfind(" at line ") {
        m = &m[..i];
    }
    if let Some((prefix, rest)) = m.split_once(": ")
        && key.starts_with(prefix)
    {
        m = rest;
    }
    m.to_owned()
}

/// Where a deserialization error at `key` is, and its message with a hint where one helps: a
/// missing key found in another map, an unknown key at its own place, a bad list item at the item.
fn place_error(spans: &Spans, key: &str, message: String) -> (Option<Place>, String) {
    let needed = message
        .strip_prefix("needs ")
        .or_else(|| message.strip_prefix("missing field `"))
        .and_then(|m| m.split([' ', ',', ':', '`']).next());
    if let Some((place, hint)) = needed.and_then(|field| spans.misplaced(key, field)) {
        return (Some(place), hint);
    }
    if message.starts_with("unknown field") {
        return (spans.key(key), message);
    }
    (spans.item_named(key, &message).or_else(|| spans.value(key)), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_overrides_win_and_are_checked_like_the_file() {
        let text = "providers:\n  idp:\n    type: oauth2\n    token_url: https://idp/t\n    client_id: a\n    client_secret: b\nroutes:\n  - prefix: /\n    upstream: https://api\n    provider: idp\n";
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap_or_else(|e| panic!("{e}"));
        let moved = ListenerOverrides { listen: Some(addr), admin: None };
        let config = env::with_lookup(|_| None, || parse_with(text, "t.yaml", moved));
        assert_eq!(config.map(|c| c.listen).ok(), Some(addr));
        let clash = ListenerOverrides { listen: Some(addr), admin: Some(addr) };
        let err =
            env::with_lookup(|_| None, || parse_with(text, "t.yaml", clash)).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("admin.listen: the admin listener must not share")),
            "{err:?}"
        );
    }
}
