//! `type: static` providers: a credential that is not fetched, such as Sensu's API keys or a
//! username and password for Basic. Values from files are read again on every refresh, so a
//! rotated key is used within a minute without a reload.

use std::path::PathBuf;

use super::provider::ProviderCommon;
use crate::secret::Secret;

/// Where a static value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Written in the configuration (or expanded from `${VAR}`).
    Inline(Secret),
    /// Read from a file (trailing newlines dropped) at every refresh.
    File(PathBuf),
}

/// A static credential.
#[derive(Debug, Clone, PartialEq)]
pub enum StaticValue {
    /// Sent as it is (`inject` says where, with which scheme).
    Value(Source),
    /// `base64(username:password)`, for `inject: { header: Authorization, scheme: Basic }`.
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: Source,
    },
}

/// A `type: static` provider.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticProvider {
    /// The credential.
    pub value: StaticValue,
    /// Settings every provider has (`allowed_upstreams` applies).
    pub common: ProviderCommon,
}

/// The provider from its keys; exactly one of `value`, `value_file` or a username with a
/// password is needed.
pub(super) fn build(
    value: Option<String>,
    value_file: Option<String>,
    username: Option<String>,
    password: Option<Source>,
    common: ProviderCommon,
) -> Result<StaticProvider, String> {
    let value = match (value, value_file, username, password) {
        (Some(v), None, None, None) if !v.is_empty() => StaticValue::Value(Source::Inline(Secret::new(v))),
        (None, Some(f), None, None) => {
            StaticValue::Value(Source::File(super::client_auth::readable("value_file", PathBuf::from(f))?))
        }
        (None, None, Some(username), Some(password)) => StaticValue::Basic { username, password },
        (Some(_), None, None, None) => return Err("value is empty".into()),
        _ => {
            return Err(
                "a static provider needs exactly one of value, value_file, or username with password (or password_file)"
                    .into(),
            );
        }
    };
    Ok(StaticProvider { value, common })
}

impl Source {
    /// The value now.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            Source::Inline(s) => Ok(s.clone()),
            Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let value = text.trim_end_matches(['\r', '\n']);
                if value.is_empty() {
                    return Err(format!("{} is empty", path.display()));
                }
                Ok(Secret::new(value))
            }
        }
    }
}

impl StaticValue {
    /// The credential now.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            StaticValue::Value(source) => source.read(),
            StaticValue::Basic { username, password } => {
                Ok(Secret::new(crate::secret::basic_credentials(username, password.read()?.expose())))
            }
        }
    }
}
