//! `tracing:` — OpenTelemetry traces of proxied requests, exported over OTLP/HTTP.

use serde::Deserialize;

use super::value::Text;

/// Where traces go and how many requests are traced.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP traces URL, like `http://otel-collector:4318/v1/traces` (a URL
    /// with no path gets `/v1/traces`). Spans are sent in batches as protobuf.
    pub otlp_endpoint: OtlpEndpoint,
    /// The share of requests traced when the caller did not decide (0 to 1, default 1). A
    /// caller's `traceparent` decides for its request: sampled is traced, not sampled is not.
    #[serde(default)]
    pub sample_ratio: SampleRatio,
    /// `service.name` of the spans (default `tokengate`).
    #[serde(default)]
    pub service_name: Option<Text>,
}

/// An `http://` or `https://` URL for OTLP/HTTP traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint(pub String);

impl<'de> Deserialize<'de> for OtlpEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        let bad = |why: &str| serde::de::Error::custom(format!("otlp_endpoint {text:?}: {why}"));
        let url = url::Url::parse(&text).map_err(|e| bad(&format!("not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(bad("write http://host:4318/v1/traces (or https://)"));
        }
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(bad("no user info or fragment"));
        }
        let mut url = url;
        if url.path() == "/" {
            url.set_path("/v1/traces");
        }
        Ok(OtlpEndpoint(url.to_string()))
    }
}

/// A share of requests, from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRatio(pub f64);

impl Default for SampleRatio {
    fn default() -> Self {
        SampleRatio(1.0)
    }
}

impl<'de> Deserialize<'de> for SampleRatio {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        match text.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(SampleRatio(r)),
            _ => Err(serde::de::Error::custom(format!(
                "sample_ratio {text:?}: a number from 0 to 1, like 0.1"
            ))),
        }
    }
}
