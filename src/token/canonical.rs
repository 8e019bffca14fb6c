//! A canonical encoding of everything that goes into a token request, so replicas (of this build
//! or another during a rolling upgrade) agree on which cached token answers which provider.
//!
//! Every field is written with a tag and a length, so no two different settings encode the same;
//! secrets enter as their SHA-256, so a rotated secret never reuses a token fetched with the old
//! one. Nothing here depends on `Debug` text or on field order in the structs.

use crate::config::{
    Assertion, BodySpec, ClientAuth, Grant, HttpRequestSpec, KeyFile, Provider, TokenEndpoint,
};
use crate::secret::Secret;

/// The encoding of `provider`'s token-request inputs.
pub fn encode(provider: &Provider) -> Vec<u8> {
    let mut e = Encoder(Vec::new());
    e.field(b"v", b"1");
    match provider {
        Provider::OAuth2(p) => {
            e.field(b"type", b"oauth2");
            match &p.endpoint {
                TokenEndpoint::Url(u) => e.field(b"token_url", u.as_str().as_bytes()),
                TokenEndpoint::Discovery { issuer } => e.field(b"issuer", issuer.as_str().as_bytes()),
            }
            match &p.grant {
                Grant::ClientCredentials => e.field(b"grant", b"client_credentials"),
                Grant::Password { username, password } => {
                    e.field(b"grant", b"password");
                    e.secret(b"username", username);
                    e.secret(b"password", password);
                }
                Grant::RefreshToken { refresh_token, .. } => {
                    e.field(b"grant", b"refresh_token");
                    e.secret(b"refresh_token", refresh_token);
                }
                Grant::JwtBearer(a) => {
                    e.field(b"grant", b"jwt_bearer");
                    match a {
                        Assertion::Signed { key, subject } => {
                            e.key(key);
                            e.field(b"subject", subject.as_bytes());
                        }
                        Assertion::File(path) => e.path(b"assertion_file", path),
                    }
                }
                Grant::TokenExchange(x) => {
                    e.field(b"grant", b"token_exchange");
                    for t in std::iter::once(&x.subject).chain(&x.actor) {
                        match &t.from {
                            crate::config::TokenFrom::File(path) => e.path(b"token_file", path),
                            crate::config::TokenFrom::Caller => e.field(b"token_from", b"caller"),
                            crate::config::TokenFrom::Provider(p) => e.field(b"token_provider", p.as_bytes()),
                        }
                        e.field(b"token_type", t.token_type.as_bytes());
                    }
                    e.field(b"requested", x.requested_token_type.as_deref().unwrap_or_default().as_bytes());
                    e.count(b"audience", x.audience.len());
                    for a in &x.audience {
                        e.field(b"audience", a.as_bytes());
                    }
                    e.count(b"resource", x.resource.len());
                    for r in &x.resource {
                        e.field(b"resource", r.as_bytes());
                    }
                }
            }
            e.field(b"client_id", p.client_id.as_bytes());
            if let Some(s) = p.client_auth.secret() {
                e.secret(b"client_secret", s);
            }
            let auth: &[u8] = match &p.client_auth {
                ClientAuth::Basic(_) => b"basic",
                ClientAuth::BasicRaw(_) => b"basic_raw",
                ClientAuth::Post(_) => b"post",
                ClientAuth::None => b"none",
                ClientAuth::SecretJwt(_) => b"client_secret_jwt",
                ClientAuth::PrivateKeyJwt(key) => {
                    e.key(key);
                    b"private_key_jwt"
                }
                ClientAuth::Tls { identity, self_signed } => {
                    e.path(b"client_cert_file", &identity.cert_file);
                    if *self_signed { b"self_signed_tls_client_auth" } else { b"tls_client_auth" }
                }
                ClientAuth::AssertionFile { path, assertion_type } => {
                    e.path(b"client_assertion_file", path);
                    e.field(b"client_assertion_type", assertion_type.as_bytes());
                    b"client_assertion_file"
                }
            };
            e.field(b"client_auth", auth);
            e.count(b"scopes", p.scopes.len());
            for s in &p.scopes {
                e.field(b"scope", s.as_bytes());
            }
            e.count(b"params", p.params.len());
            for (k, v) in &p.params {
                e.field(b"param", k.as_bytes());
                e.field(b"value", v.as_bytes());
            }
            e.headers(&p.headers);
        }
        Provider::Static(p) => {
            // Never shared (there is no IdP to spare), but encoded like any other.
            use crate::config::static_provider::{Source, StaticValue};
            e.field(b"type", b"static");
            let source = |e: &mut Encoder, s: &Source| match s {
                Source::Inline(v) => e.secret(b"value", v),
                Source::File(f) => e.path(b"value_file", f),
            };
            match &p.value {
                StaticValue::Value(s) => source(&mut e, s),
                StaticValue::Basic { username, password } => {
                    e.field(b"username", username.as_bytes());
                    source(&mut e, password);
                }
            }
        }
        Provider::Http(p) => {
            e.field(b"type", b"http");
            e.request(b"login", &p.login);
            match &p.refresh {
                Some(r) => e.request(b"refresh", r),
                None => e.field(b"refresh", b""),
            }
        }
    }
    e.0
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn path(&mut self, name: &[u8], path: &std::path::Path) {
        self.field(name, path.as_os_str().as_encoded_bytes());
    }

    /// The key by file and algorithm: the client it identifies does not change when the key
    /// is rotated in place.
    fn key(&mut self, key: &KeyFile) {
        self.path(b"private_key_file", &key.path);
        self.field(b"signing_alg", key.alg.name().as_bytes());
        self.field(b"key_id", key.key_id.as_deref().unwrap_or_default().as_bytes());
    }

    fn field(&mut self, tag: &[u8], value: &[u8]) {
        for part in [tag, value] {
            self.0.extend_from_slice(&(part.len() as u64).to_be_bytes());
            self.0.extend_from_slice(part);
        }
    }

    fn count(&mut self, tag: &[u8], n: usize) {
        self.field(tag, &(n as u64).to_be_bytes());
    }

    fn secret(&mut self, tag: &[u8], s: &Secret) {
        self.field(tag, ring::digest::digest(&ring::digest::SHA256, s.expose().as_bytes()).as_ref());
    }

    fn headers(&mut self, headers: &[(http::HeaderName, http::HeaderValue)]) {
        self.count(b"headers", headers.len());
        for (name, value) in headers {
            self.field(b"header", name.as_str().as_bytes());
            // Header values may be credentials (an API key header): digested like secrets.
            self.field(b"value", ring::digest::digest(&ring::digest::SHA256, value.as_bytes()).as_ref());
        }
    }

    fn request(&mut self, tag: &[u8], r: &HttpRequestSpec) {
        self.field(b"request", tag);
        self.field(b"method", r.method.as_str().as_bytes());
        self.field(b"url", r.url.as_str().as_bytes());
        match &r.basic {
            Some((user, password)) => {
                self.secret(b"basic_user", user);
                self.secret(b"basic_password", password);
            }
            None => self.field(b"basic", b""),
        }
        self.field(b"bearer_current_token", if r.bearer_current_token { b"1" } else { b"0" });
        let (kind, fields): (&[u8], &[(String, Secret)]) = match &r.body {
            BodySpec::None => (b"none", &[]),
            BodySpec::Form(f) => (b"form", f),
            BodySpec::Json(f) => (b"json", f),
        };
        self.field(b"body", kind);
        self.count(b"fields", fields.len());
        for (k, v) in fields {
            self.field(b"name", k.as_bytes());
            self.secret(b"value", v);
        }
        self.headers(&r.headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(extra: &str) -> Provider {
        let text = format!(
            "providers:\n  p:\n    type: oauth2\n    token_url: https://idp.example/token\n    client_id: app\n    client_secret: s3cret\n{extra}routes:\n  - prefix: /\n    upstream: https://api.example\n    provider: p\n"
        );
        crate::config::parse(&text, "t.yaml").unwrap().providers.remove("p").unwrap()
    }

    #[test]
    fn every_input_changes_the_encoding_and_nothing_else_does() {
        let base = encode(&provider(""));
        assert_eq!(base, encode(&provider("")), "stable");
        assert_eq!(base, encode(&provider("    timeout: 9s\n")), "the timeout is not a token input");
        for extra in [
            "    scopes: [a]\n",
            "    client_auth: post\n",
            "    params: {audience: x}\n",
            "    headers: {X-Tenant: t}\n",
        ] {
            assert_ne!(base, encode(&provider(extra)), "{extra}");
        }
        let other_secret = crate::config::parse(
            "providers:\n  p:\n    type: oauth2\n    token_url: https://idp.example/token\n    client_id: app\n    client_secret: rotated\nroutes:\n  - prefix: /\n    upstream: https://api.example\n    provider: p\n",
            "t.yaml",
        )
        .unwrap();
        assert_ne!(base, encode(&other_secret.providers["p"]), "a rotated secret");
        assert!(!base.windows(6).any(|w| w == b"s3cret"), "the secret itself is not in the encoding");
        // Scopes [a b] and [ab] differ: fields are length-prefixed.
        assert_ne!(encode(&provider("    scopes: [a, b]\n")), encode(&provider("    scopes: [ab]\n")));
    }
}
