//! Configuration: the YAML schema (`schema`, `route`, `provider`, ...), loading (`load`), checks
//! between keys (`validate`) and where in the file each key is (`locate`).
//!
//! The file is parsed once into these types; the rest of tokengate never sees an invalid route, an
//! unknown grant or a missing secret. Every string value may use `${VAR}` (see [`mod@env`]).

mod access;
mod callers;
mod client_auth;
mod egress;
pub mod env;
mod files;
mod http_provider;
mod inject;
pub mod json_schema;
mod load;
mod locate;
mod provider;
mod redis;
mod route;
mod schema;
mod source;
pub mod static_provider;
mod traces;
mod validate;
mod value;

pub use access::{
    Access, ApiKeys, Cidr, ForwardedFormat, accepts_any, allowed, constant_time_eq, host_served,
};
pub use callers::{Caller, Callers, CertMatch, JwksSource, JwtCaller, Method, MethodKind, subject_matches};
pub use client_auth::{
    AssertionSettings, Audience, CertifiedPem, ClientAuth, IdentityFiles, JWT_BEARER_ASSERTION, KeyFile,
    MAX_ASSERTION_LIFETIME, certified_pem,
};
pub use egress::{Egress, EgressSetting, NoProxy, ProxyUrl};
pub use http_provider::FieldMap;
pub use http_provider::{BodySpec, HttpProvider, HttpRequestSpec};
pub use inject::Inject;
pub use load::{ListenerOverrides, load, override_listeners, parse, permission_warning};
pub use locate::Place;
pub use provider::{
    AllowedUpstream, Assertion, ExchangeToken, Grant, OAuth2Provider, Provider, ProviderCommon,
    TokenEndpoint, TokenExchange, TokenFrom, is_loopback,
};
pub use redis::RedisTarget;
pub use route::{Prefix, RouteConfig, TunnelLifetime, Upstream, UpstreamProtocol};
pub use schema::{
    AccessLogConfig, AccessLogFormat, AccessLogTo, Admin, ClientCertMode, Config, ForwardProxy, InboundTls,
    Limits, SharedCacheConfig,
};
pub use traces::{OtlpEndpoint, SampleRatio, Tracing};
pub use value::{Text, parse_duration, parse_size};

/// A configuration that could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the file: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: source::SourceError,
    },
    /// Environment variables the file uses are not set (all of them, with their lines).
    #[error("{path}:{}: environment variables not set: {}", missing.first().map_or(0, |m| m.0), missing.iter().map(|(line, name)| format!("{name} (line {line})")).collect::<Vec<_>>().join(", "))]
    MissingEnv {
        /// The file.
        path: String,
        /// Line and name of each reference to an unset variable.
        missing: Vec<(usize, String)>,
    },
    /// A value is malformed or missing, or values do not fit together.
    #[error("{path}:{}: {key}: {message}", place.map_or_else(|| "?".to_string(), |p| format!("{}:{}", p.line, p.column)))]
    Invalid {
        /// The file.
        path: String,
        /// Line and column of the offending key or value, where it could be found.
        place: Option<Place>,
        /// Dotted key path, like `routes[2].provider`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(path: &str, place: Option<Place>, key: String, message: String) -> ConfigError {
        ConfigError::Invalid { path: path.to_owned(), place, key, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
providers:
  idp:
    type: oauth2
    token_url: https://idp.example.com/token
    client_id: app
    client_secret: s3cret
    scopes: [read]
routes:
  - prefix: /api/
    upstream: https://api.example.com/v2/
    provider: idp
";

    fn parse_with_env(text: &str) -> Result<Config, ConfigError> {
        env::with_lookup(|_| None, || parse(text, "test.yaml"))
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse_with_env(MINIMAL).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        let r = &c.routes[0];
        assert_eq!(r.prefix.as_str(), "/api");
        assert_eq!(r.upstream.base_path, "/v2");
        assert_eq!(r.upstream.authority.as_str(), "api.example.com");
        assert!(r.strip_prefix);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text =
            MINIMAL.replace("strip", "x").replace("    provider: idp", "    provider: idp\n    upstrem: x");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:12:5: routes[0].upstrem: unknown field `upstrem`"), "{err}");
    }

    #[test]
    fn unknown_provider_reference_names_line() {
        let text = MINIMAL.replace("provider: idp", "provider: nope");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "test.yaml:11:15: routes[0].provider: no provider named \"nope\"; defined providers: idp"
        );
    }

    #[test]
    fn bad_values_are_rejected_with_their_line() {
        for (from, to, needle) in [
            (
                "prefix: /api/",
                "prefix: api",
                "test.yaml:9:13: routes[0].prefix: prefix \"api\" must start with '/'",
            ),
            (
                "prefix: /api/",
                "prefix: /a/../b",
                "test.yaml:9:13: routes[0].prefix: prefix \"/a/../b\" must be a plain path",
            ),
            (
                "https://api.example.com/v2/",
                "ftp://x",
                "test.yaml:10:15: routes[0].upstream: upstream \"ftp://x\" must start with https://",
            ),
            (
                "https://api.example.com/v2/",
                "https://u:p@x/",
                "test.yaml:10:15: routes[0].upstream: upstream \"https://u:p@x/\" must not contain user info",
            ),
            (
                "https://api.example.com/v2/",
                "https://x/?a=1",
                "test.yaml:10:15: routes[0].upstream: upstream \"https://x/?a=1\" must not have a query",
            ),
            ("client_id: app", "client_id: ''", "test.yaml:2:3: providers.idp: client_id is empty"),
            (
                "scopes: [read]",
                "scopes: [read]\n    username: bob",
                "test.yaml:2:3: providers.idp: username does not apply",
            ),
        ] {
            let err = parse_with_env(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            assert!(err.starts_with(needle), "{to}: {err}");
        }
    }

    #[test]
    fn warns_about_readable_files_with_inline_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, MINIMAL).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = permission_warning(&path).unwrap();
        assert!(w.contains("c.yaml:6:") && w.contains("mode 644"), "{w}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(permission_warning(&path).is_none());
        std::fs::write(&path, MINIMAL.replace("s3cret", "${SECRET}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(permission_warning(&path).is_none());
    }

    #[test]
    fn a_key_in_the_wrong_map_is_reported_at_its_own_line() {
        let moved = |indent: &str| {
            let text = MINIMAL
                .replace("    client_id: app\n", "")
                .replace("    scopes: [read]\n", &format!("    scopes: [read]\n{indent}client_id: app\n"));
            parse_with_env(&text).unwrap_err().to_string()
        };
        // Two spaces: YAML reads a provider named client_id, and idp lacks the key.
        let err = moved("  ");
        assert!(
            err.starts_with("test.yaml:7:3: providers.idp: `client_id` here is indented 2 spaces"),
            "{err}"
        );
        assert!(err.contains("(indented 4)"), "{err}");
        // Three spaces: no map's keys are there, which YAML itself refuses.
        let err = moved("   ");
        assert!(err.starts_with("test.yaml:7:4: yaml: "), "{err}");
        assert!(err.contains("line 7 is indented 3 spaces, like no key above it"), "{err}");
        // Really missing: the plain message, at the provider's line.
        let text = MINIMAL.replace("    client_id: app\n", "");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:2:3: providers.idp: needs client_id"), "{err}");
    }

    #[test]
    fn indentation_and_syntax_errors_point_at_the_line_and_column() {
        for (from, to, at, says) in [
            (
                "    upstream:",
                "   upstream:",
                "10:4",
                "line 10 is indented 3 spaces, unlike the lines around it (4)",
            ),
            (
                "    upstream:",
                "     upstream:",
                "10:6",
                "line 10 is indented 5 spaces, unlike the lines around it (4)",
            ),
            (
                "    upstream:",
                "  upstream:",
                "10:3",
                "line 10 is indented 2 spaces, unlike the lines around it (4)",
            ),
            ("    client_id:", "\tclient_id:", "5:1", "line 5 is indented with a tab"),
            ("    upstream: https", "    upstream https", "10:5", "`upstream` has no ':' after it"),
            ("    client_id: app", "    client_id app", "5:5", "`client_id` has no ':' after it"),
            (
                "    client_id: app",
                "  client_id: app",
                "5:3",
                "line 5 is indented 2 spaces, unlike the lines around it (4)",
            ),
        ] {
            let err = parse_with_env(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("test.yaml:{at}: yaml: ")) && err.contains(says), "{to}: {err}");
        }
        // A route key in the next route's place is a key of the wrong item.
        let text = MINIMAL.replace("    provider: idp\n", "") + "  - provider: idp\n";
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:9:5: routes[0]: missing field `provider`"), "{err}");
    }

    #[test]
    fn bad_top_level_cidrs_are_reported_at_their_own_line() {
        for (section, extra) in [("access", ""), ("forward_proxy", "  listen: 127.0.0.1:3128\n")] {
            let text = format!("{section}:\n{extra}  allow: [10.0.0.0/8, 10.0.0.0/33]\n{MINIMAL}");
            let err = parse_with_env(&text).unwrap_err().to_string();
            let line = if extra.is_empty() { 2 } else { 3 };
            assert!(err.starts_with(&format!("test.yaml:{line}:23: {section}.allow[1]: ")), "{err}");
            let block = format!("{section}:\n{extra}  allow:\n    - 10.0.0.0/8\n    - 300.0.0.1\n{MINIMAL}");
            let err = parse_with_env(&block).unwrap_err().to_string();
            assert!(err.starts_with(&format!("test.yaml:{}:7: {section}.allow[1]: ", line + 2)), "{err}");
        }
    }

    #[test]
    fn duplicate_prefix_is_an_error() {
        let text = format!("{MINIMAL}  - prefix: /api\n    upstream: https://b/\n    provider: idp\n");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.contains("routes[1].prefix") && err.contains("earlier route"), "{err}");
        assert!(err.starts_with("test.yaml:12:"), "{err}");
    }

    #[test]
    fn env_vars_expand_inside_values_without_changing_structure() {
        let text = MINIMAL.replace("client_secret: s3cret", "client_secret: ${SECRET}");
        let c =
            env::with_lookup(|n| (n == "SECRET").then(|| "a: b # c".to_string()), || parse(&text, "t.yaml"))
                .unwrap();
        let Provider::OAuth2(p) = &c.providers["idp"] else { panic!("not oauth2") };
        assert_eq!(p.client_auth.secret().unwrap().expose(), "a: b # c");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert_eq!(err, "test.yaml:6: environment variables not set: SECRET (line 6)");
    }

    /// Every string value of the schema may use `${VAR}`: a table of keys, each given a variable,
    /// and not one `${` may survive parsing while every expanded value is in the result.
    #[test]
    fn every_string_value_expands_variables() {
        let table = [
            ("listen", "listen: ${LISTEN}"),
            ("admin.listen", "admin:\n  listen: ${ADMIN_LISTEN}\n  hosts:\n    - ${ADMIN_HOST}"),
            (
                "tls",
                "tls:\n  listen: ${TLS_LISTEN}\n  cert_file: ${TLS_CERT}\n  key_file: ${TLS_KEY}\n  client_ca_file: ${TLS_CA}",
            ),
            ("forward_proxy.listen", "forward_proxy:\n  listen: ${FWD_LISTEN}"),
            ("access", "access:\n  hosts:\n    - ${ACCESS_HOST}"),
            ("access_log", "access_log: ${ACCESS_LOG}"),
            (
                "providers",
                "providers:\n  idp:\n    type: oauth2\n    token_url: ${TOKEN_URL}\n    client_id: ${CLIENT_ID}\n    client_secret: s\n    scopes:\n      - ${SCOPE}\n    params:\n      audience: ${AUDIENCE}\n    headers:\n      X-Idp: ${IDP_HEADER}\n    ca_file: ${IDP_CA}\n    allowed_upstreams:\n      - ${ALLOWED}.example",
            ),
            (
                "routes",
                "routes:\n  - name: ${ROUTE_NAME}\n    prefix: ${PREFIX}\n    upstream: ${UPSTREAM}\n    provider: idp\n    ca_file: ${ROUTE_CA}\n    headers:\n      X-Tenant: ${TENANT}",
            ),
        ];
        // Each value holds its variable's name in lower case, the marker looked for below.
        let value = |name: &str| match name {
            n if n.ends_with("LISTEN") => format!("127.0.0.{}:1{}", n.len(), n.len()),
            "TOKEN_URL" => "https://idp.example/token_url".into(),
            "UPSTREAM" => "https://allowed.example/upstream".into(),
            "PREFIX" => "/prefix".into(),
            "ALLOWED" => "allowed".into(),
            n => format!("/expanded-{}", n.to_lowercase()),
        };
        let text: String = table.iter().map(|(_, yaml)| format!("{yaml}\n")).collect();
        let config = env::with_lookup(move |n| Some(value(n)), || parse(&text, "t.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("${"), "{shown}");
        // Header values are hidden from Debug: looked at directly.
        let Provider::OAuth2(idp) = &config.providers["idp"] else { panic!("not oauth2") };
        let headers = idp.headers.iter().chain(&config.routes[0].headers).map(|(_, v)| v.as_bytes());
        let headers: Vec<String> = headers.map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        for (key, yaml) in table {
            for var in yaml.split("${").skip(1).filter_map(|v| v.split('}').next()) {
                let marker = if var.ends_with("LISTEN") { value(var) } else { var.to_lowercase() };
                let found = shown.contains(&marker) || headers.iter().any(|h| h.contains(&marker));
                assert!(found, "{key}: ${{{var}}} was not expanded: {shown}");
            }
        }
    }

    fn with_key(extra: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
        std::fs::write(&key, pem).unwrap();
        let text = MINIMAL.replace(
            "    client_secret: s3cret\n",
            &format!("    client_auth: private_key_jwt\n    private_key_file: {}\n{extra}", key.display()),
        );
        (dir, text)
    }

    #[test]
    fn private_key_jwt_settles_the_algorithm_and_audience_at_load() {
        let (_dir, text) = with_key("");
        let c = parse_with_env(&text).unwrap();
        let Provider::OAuth2(p) = &c.providers["idp"] else { panic!() };
        let ClientAuth::PrivateKeyJwt(key) = &p.client_auth else { panic!("{:?}", p.client_auth) };
        assert_eq!(key.alg, crate::jose::SigningAlg::ES256);
        // With token_url, the assertion is addressed to the token endpoint.
        assert_eq!(p.assertion.audience, Audience::TokenEndpoint);
        assert_eq!(p.assertion.lifetime, std::time::Duration::from_secs(60));
        assert!(c.files.iter().any(|f| f.ends_with("key.pem")), "the key file is watched");
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn client_authentication_mistakes_are_load_errors() {
        for (extra, needle) in [
            ("    signing_alg: RS256\n", "cannot sign RS256; use signing_alg: ES256"),
            ("    client_secret: s3cret\n", "client_secret does not apply to client_auth: private_key_jwt"),
            ("    assertion_lifetime: 1h\n", "assertion_lifetime must be between 10s and 5m"),
            ("    assertion_audience: issuer\n", "assertion_audience: issuer needs issuer"),
            ("    client_cert_file: c.pem\n", "client_cert_file needs client_key_file"),
        ] {
            let (_dir, text) = with_key(extra);
            let err = parse_with_env(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("test.yaml:2:3: providers.idp: ") && err.contains(needle),
                "{extra}: {err}"
            );
        }
        for (from, to, needle) in [
            (
                "    client_secret: s3cret\n",
                "",
                "needs client_secret (or client_secret_file), or client_auth: private_key_jwt",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_auth: private_key_jwt\n    private_key_file: /nonexistent/key.pem\n",
                "cannot read private_key_file \"/nonexistent/key.pem\"",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_auth: tls_client_auth\n",
                "client_auth: tls_client_auth needs client_cert_file and client_key_file",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_auth: client_assertion_file\n    client_assertion_file: /nonexistent/token\n",
                "cannot read client_assertion_file",
            ),
            (
                "    client_secret: s3cret\n",
                "    grant: jwt_bearer\n",
                "grant jwt_bearer needs assertion_file, or private_key_file",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_secret: s3cret\n    grant: token_exchange\n",
                "needs a token_exchange block",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_secret: s3cret\n    token_exchange:\n      subject_token_file: /x\n",
                "token_exchange settings need grant: token_exchange",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_secret: s3cret\n    params: {client_assertion: x}\n",
                "params.client_assertion is set by tokengate",
            ),
        ] {
            let err = parse_with_env(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }

    #[test]
    fn a_token_exchange_reads_its_files_and_expands_token_types() {
        let dir = tempfile::tempdir().unwrap();
        let subject = dir.path().join("subject");
        std::fs::write(&subject, "eyJ.x.y").unwrap();
        let text = MINIMAL.replace(
            "    client_secret: s3cret\n",
            &format!(
                "    client_secret: s3cret\n    grant: token_exchange\n    token_exchange:\n      subject_token_file: {}\n      subject_token_type: access_token\n      requested_token_type: jwt\n      audience: [a, b]\n      resource: https://r\n",
                subject.display()
            ),
        );
        let c = parse_with_env(&text).unwrap();
        let Provider::OAuth2(p) = &c.providers["idp"] else { panic!() };
        let Grant::TokenExchange(x) = &p.grant else { panic!() };
        assert_eq!(x.subject.token_type, "urn:ietf:params:oauth:token-type:access_token");
        assert_eq!(x.requested_token_type.as_deref(), Some("urn:ietf:params:oauth:token-type:jwt"));
        assert_eq!(x.audience, ["a", "b"]);
        assert_eq!(x.resource, ["https://r"]);
        // The subject token is data read per fetch, not configuration: its rotation is no reload.
        assert!(!c.files.iter().any(|f| f == &subject));
    }

    #[test]
    fn allowed_upstreams_keep_a_providers_tokens_on_its_own_hosts() {
        let ok = [
            "[api.example.com]",
            "[\"*.example.com\"]",
            "[https://api.example.com/v2]",
            "[https://api.example.com]",
            "[other.example.org, API.example.com]",
        ];
        for allowed in ok {
            let text = MINIMAL.replace(
                "    scopes: [read]\n",
                &format!("    scopes: [read]\n    allowed_upstreams: {allowed}\n"),
            );
            parse_with_env(&text).unwrap_or_else(|e| panic!("{allowed}: {e}"));
        }
        let refused = [
            "[other.example.com]",
            "[\"*.api.example.com\"]",
            "[https://api.example.com/v1]",
            "[https://api.example.com/v]",
            "[http://api.example.com]",
            "[\"https://api.example.com:8443\"]",
        ];
        for allowed in refused {
            let text = MINIMAL.replace(
                "    scopes: [read]\n",
                &format!("    scopes: [read]\n    allowed_upstreams: {allowed}\n"),
            );
            let err = parse_with_env(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("test.yaml:11:15: routes[0].upstream: route /api sends provider idp's tokens to https://api.example.com/v2, which is not in its allowed_upstreams"),
                "{allowed}: {err}"
            );
        }
    }
}
