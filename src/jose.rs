//! Signing JWTs (RFC 7515 compact JWS) with keys from PEM files: RS256, PS256, ES256 and EdDSA
//! with a private key, HS256 with a shared secret. The signatures come from ring, the crypto
//! library rustls already uses; this module only serialises headers and claims around them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A JWS signing algorithm for a private key (RFC 7518 section 3, RFC 8037).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
pub enum SigningAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// ECDSA with P-256 and SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl SigningAlg {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            SigningAlg::RS256 => "RS256",
            SigningAlg::PS256 => "PS256",
            SigningAlg::ES256 => "ES256",
            SigningAlg::EdDSA => "EdDSA",
        }
    }
}

/// Why a key or certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not PEM, or no private key in it.
    #[error("no PEM private key found ({0})")]
    NotPem(String),
    /// A SEC1 (`BEGIN EC PRIVATE KEY`) key, which ring reads only as PKCS#8.
    #[error(
        "is a SEC1 EC key (BEGIN EC PRIVATE KEY); convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in key.pem -out key-pkcs8.pem`"
    )]
    Sec1,
    /// A key of a type or size ring does not sign with.
    #[error("is not an RSA (2048-8192 bit), P-256 or Ed25519 private key: {0}")]
    Unsupported(String),
    /// The key type does not match the configured algorithm.
    #[error("holds {key} key, which cannot sign {alg}; use signing_alg: {suggest}")]
    WrongAlg {
        /// The key type found.
        key: &'static str,
        /// The configured algorithm.
        alg: &'static str,
        /// An algorithm this key can sign.
        suggest: &'static str,
    },
    /// The certificate file holds no certificate.
    #[error("holds no PEM certificate")]
    NoCertificate,
}

enum Key {
    Rsa(signature::RsaKeyPair),
    Ec(signature::EcdsaKeyPair),
    Ed(signature::Ed25519KeyPair),
}

/// A private key ready to sign, with the `kid` and thumbprints that go into JWS headers.
pub struct SigningKey {
    key: Key,
    alg: SigningAlg,
    kid: String,
    x5t_s256: Option<String>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("alg", &self.alg).field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PEM private key (PKCS#8, or PKCS#1 for RSA). `alg` defaults to the key's own:
    /// RS256 for RSA, ES256 for P-256, EdDSA for Ed25519. The `kid` is `key_id` when given,
    /// else the key's RFC 7638 JWK thumbprint; `certificate` (PEM) adds `x5t#S256`.
    pub fn from_pem(
        pem: &[u8],
        alg: Option<SigningAlg>,
        key_id: Option<&str>,
        certificate: Option<&[u8]>,
    ) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| KeyError::NotPem(e.to_string()))?;
        let key = match &der {
            PrivateKeyDer::Pkcs1(k) => signature::RsaKeyPair::from_der(k.secret_pkcs1_der())
                .map(Key::Rsa)
                .map_err(|e| KeyError::Unsupported(e.to_string()))?,
            PrivateKeyDer::Sec1(_) => return Err(KeyError::Sec1),
            PrivateKeyDer::Pkcs8(k) => {
                let bytes = k.secret_pkcs8_der();
                if let Ok(k) = signature::RsaKeyPair::from_pkcs8(bytes) {
                    Key::Rsa(k)
                } else if let Ok(k) = signature::EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    bytes,
                    &rng,
                ) {
                    Key::Ec(k)
                } else {
                    signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes)
                        .map(Key::Ed)
                        .map_err(|e| KeyError::Unsupported(e.to_string()))?
                }
            }
            _ => return Err(KeyError::Unsupported("unknown key encoding".into())),
        };
        let (kind, default, allowed): (&str, SigningAlg, &[SigningAlg]) = match key {
            Key::Rsa(_) => ("an RSA", SigningAlg::RS256, &[SigningAlg::RS256, SigningAlg::PS256]),
            Key::Ec(_) => ("a P-256", SigningAlg::ES256, &[SigningAlg::ES256]),
            Key::Ed(_) => ("an Ed25519", SigningAlg::EdDSA, &[SigningAlg::EdDSA]),
        };
        let alg = alg.unwrap_or(default);
        if !allowed.contains(&alg) {
            return Err(KeyError::WrongAlg { key: kind, alg: alg.name(), suggest: default.name() });
        }
        let x5t_s256 = match certificate {
            None => None,
            Some(pem) => {
                let cert = CertificateDer::pem_slice_iter(pem)
                    .next()
                    .and_then(Result::ok)
                    .ok_or(KeyError::NoCertificate)?;
                Some(URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &cert)))
            }
        };
        let kid = match key_id {
            Some(id) => id.to_owned(),
            None => thumbprint(&public_jwk(&key)),
        };
        Ok(SigningKey { key, alg, kid, x5t_s256, rng })
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// The `kid` header value.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (RFC 7517), with `kid` and `alg`: what the identity provider
    /// registers for this client.
    pub fn public_jwk(&self) -> serde_json::Value {
        let mut jwk = public_jwk(&self.key);
        jwk["kid"] = self.kid.clone().into();
        jwk["alg"] = self.alg.name().into();
        jwk["use"] = "sig".into();
        jwk
    }

    /// `header.claims.signature`, with header `{alg, typ: JWT, kid[, x5t#S256]}`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, ring::error::Unspecified> {
        let mut header = serde_json::json!({ "alg": self.alg.name(), "typ": "JWT", "kid": self.kid });
        if let Some(t) = &self.x5t_s256 {
            header["x5t#S256"] = t.clone().into();
        }
        let input = signing_input(&header, claims);
        let sig = match (&self.key, self.alg) {
            (Key::Rsa(k), alg) => {
                let padding: &dyn signature::RsaEncoding = if alg == SigningAlg::PS256 {
                    &signature::RSA_PSS_SHA256
                } else {
                    &signature::RSA_PKCS1_SHA256
                };
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(padding, &self.rng, input.as_bytes(), &mut out)?;
                out
            }
            (Key::Ec(k), _) => k.sign(&self.rng, input.as_bytes())?.as_ref().to_vec(),
            (Key::Ed(k), _) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// An HS256 JWT signed with `secret` (client_secret_jwt).
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let input = signing_input(&serde_json::json!({ "alg": "HS256", "typ": "JWT" }), claims);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()))
}

/// The public half of `key` as a JWK with only its required members.
fn public_jwk(key: &Key) -> serde_json::Value {
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    match key {
        Key::Rsa(k) => {
            let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
            serde_json::json!({ "kty": "RSA", "n": b64(&c.n), "e": b64(&c.e) })
        }
        Key::Ec(k) => {
            // Uncompressed point: 0x04 || x || y.
            let p = k.public_key().as_ref();
            serde_json::json!({ "kty": "EC", "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..65]) })
        }
        Key::Ed(k) => {
            serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key().as_ref()) })
        }
    }
}

/// RFC 7638 JWK thumbprint: SHA-256 over the required members in lexicographic order, without
/// whitespace (serde_json's map is ordered, and `public_jwk` holds only those members).
fn thumbprint(jwk: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, jwk.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_thumbprint_example() {
        // RFC 7638 section 3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB"
        });
        assert_eq!(thumbprint(&jwk), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn the_key_type_decides_which_algorithms_are_allowed() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = SigningKey::from_pem(ec.serialize_pem().as_bytes(), None, None, None).unwrap();
        assert_eq!(key.alg(), SigningAlg::ES256);
        let err = SigningKey::from_pem(ec.serialize_pem().as_bytes(), Some(SigningAlg::RS256), None, None)
            .unwrap_err();
        assert!(err.to_string().contains("use signing_alg: ES256"), "{err}");
        let err = SigningKey::from_pem(b"not a key", None, None, None).unwrap_err();
        assert!(matches!(err, KeyError::NotPem(_)), "{err}");
    }

    #[test]
    fn debug_shows_no_key_material() {
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let key = SigningKey::from_pem(ed.serialize_pem().as_bytes(), None, Some("k1"), None).unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey { alg: EdDSA, kid: \"k1\", .. }");
    }
}
