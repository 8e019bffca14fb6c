//! The configuration's JSON Schema, for editors (yaml-language-server) and CI linters. It is
//! generated from the config types themselves (`schemars` reads their serde attributes and doc
//! comments), so it cannot drift from what `load` accepts; this file describes the values that
//! are parsed by hand (durations, sizes, addresses, prefixes, upstream URLs).

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use super::*;

/// A type deserialized through another (`#[serde(try_from = ...)]`) has that type's schema.
macro_rules! schema_as {
    ($ty:ty => $raw:ty) => {
        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                <$raw as schemars::JsonSchema>::schema_name()
            }
            fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
                <$raw as schemars::JsonSchema>::json_schema(generator)
            }
        }
    };
}
pub(super) use schema_as;

/// A `${VAR}` reference, accepted wherever a string is.
const VAR: &str = r".*\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}.*";

/// The schema of the whole file, as JSON (draft-07, which yaml-language-server reads).
pub fn generate() -> String {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<Config>();
    schema.insert("title".into(), "tokengate configuration".into());
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// A string value matching `pattern` (or a `${VAR}` reference), described for the editor.
fn pattern(pattern: &str, description: &str) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": format!("^({pattern}|{VAR})$"),
        "description": description,
    })
}

macro_rules! text_schema {
    ($($ty:ty => $name:literal, $schema:expr;)*) => {$(
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn inline_schema() -> bool {
                true
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                $schema
            }
        }
    )*};
}

/// A duration written `30s`, `5m`, `1h30m` (for `#[schemars(with)]`).
pub struct DurationText;
/// A size written `512`, `64KiB`, `1MiB` (for `#[schemars(with)]`).
pub struct SizeText;
/// A file path (for `#[schemars(with)]`).
pub struct PathText;
/// A socket address `host:port` (for `#[schemars(with)]`).
pub struct AddressText;

text_schema! {
    Text => "Text", json_schema!({ "type": ["string", "number", "boolean"] });
    DurationText => "Duration", pattern(r"\s*([0-9]+(ms|s|m|h|d))+\s*", "a duration: 500ms, 30s, 5m, 1h, 1h30m, 2d");
    SizeText => "Size", json_schema!({
        "anyOf": [
            { "type": "integer", "minimum": 0 },
            pattern(r"\s*[0-9]+\s*(B|KiB|MiB|GiB|KB|kB|MB|GB)?\s*", "a size: 512, 64KiB, 1MiB, 10MB"),
        ]
    });
    PathText => "Path", json_schema!({ "type": "string", "minLength": 1, "description": "a file path (not ~/...)" });
    AddressText => "Address", json_schema!({ "type": "string", "description": "host:port, like 127.0.0.1:8080 or [::1]:8080" });
    Prefix => "Prefix", pattern(r"/[^*?#;]*", "a path prefix such as /api, matched on whole segments");
    Upstream => "Upstream", pattern(r"(https|http|wss|ws)://[^/?#@]+(/[^?#]*)?", "https://host[:port][/base/path]");
    TunnelLifetime => "TunnelLifetime", json_schema!({
        "anyOf": [
            { "const": "token", "description": "close before the token the tunnel was opened with expires" },
            DurationText::json_schema(&mut SchemaGenerator::default()),
        ]
    });
    AccessLogConfig => "AccessLog", json_schema!({
        "anyOf": [
            { "type": "string", "description": "stderr, off, or a file path" },
            {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "to": { "type": "string", "description": "stderr, off, or a file path" },
                    "format": { "enum": ["text", "json"] },
                },
            },
        ]
    });
    EgressSetting => "EgressProxy", json_schema!({
        "type": "string",
        "description": "http://[user@]host:port, env (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) or none",
    });
    Cidr => "Cidr", json_schema!({ "type": "string", "description": "an address block or address: 10.0.0.0/8, 127.0.0.1, ::1/128" });
    OtlpEndpoint => "OtlpEndpoint", pattern(r"https?://.+", "the collector's OTLP/HTTP traces URL");
    SampleRatio => "SampleRatio", json_schema!({ "type": "number", "minimum": 0, "maximum": 1 });
}
