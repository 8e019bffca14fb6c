//! What `/readyz` means: "this replica can serve".
//!
//! A replica is ready once its configuration is loaded, its listeners are up and the start-up
//! token warm-up has finished (every provider has a token, or `limits.warmup_timeout` passed),
//! and until shutdown begins. After the warm-up a provider's health is reported in the body and
//! the metrics but does not flip readiness: an IdP outage longer than a token lifetime would
//! otherwise take every replica out of the Service at once, and clients would get connection
//! errors instead of tokengate's `503 token_unavailable`. `?strict=1` (or
//! `admin.strict_readiness`) also requires every provider to hold a valid token.

use std::sync::atomic::{AtomicU8, Ordering};

use http::StatusCode;

/// The phases of a replica's life, as `/readyz` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for the first tokens.
    WarmingUp = 0,
    /// Serving.
    Serving = 1,
    /// SIGTERM received: load balancers should stop sending.
    ShuttingDown = 2,
}

/// The replica's phase, shared by the server (which moves it on) and the admin listener.
#[derive(Debug)]
pub struct Readiness(AtomicU8);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(AtomicU8::new(Phase::WarmingUp as u8))
    }
}

impl Readiness {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::WarmingUp,
            1 => Phase::Serving,
            _ => Phase::ShuttingDown,
        }
    }

    /// The warm-up is over (a no-op once shutdown has begun).
    pub fn warmed_up(&self) {
        let _ = self.0.compare_exchange(
            Phase::WarmingUp as u8,
            Phase::Serving as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Shutdown has begun: unready from now on.
    pub fn shutting_down(&self) {
        self.0.store(Phase::ShuttingDown as u8, Ordering::Release);
    }

    /// The `/readyz` status and body; `providers` is each provider's status (with `ready`).
    pub fn answer(
        &self,
        providers: serde_json::Map<String, serde_json::Value>,
        strict: bool,
    ) -> (StatusCode, serde_json::Value) {
        let tokens = providers.values().all(|s| s["ready"] == true);
        let phase = self.phase();
        let ready = phase == Phase::Serving && (tokens || !strict);
        let status = match phase {
            Phase::WarmingUp => "warming_up",
            Phase::Serving if ready => "ready",
            Phase::Serving => "tokens_missing",
            Phase::ShuttingDown => "shutting_down",
        };
        let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (
            code,
            serde_json::json!({
                "ready": ready,
                "status": status,
                "strict": strict,
                "all_tokens_valid": tokens,
                "providers": providers,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn providers(ready: bool) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("idp".into(), serde_json::json!({ "ready": ready }));
        m
    }

    #[test]
    fn ready_after_warm_up_whatever_the_providers_unless_strict() {
        let r = Readiness::default();
        assert_eq!(r.answer(providers(true), false).0, StatusCode::SERVICE_UNAVAILABLE);
        r.warmed_up();
        assert_eq!(r.answer(providers(true), false).0, StatusCode::OK);
        let (code, body) = r.answer(providers(false), false);
        assert_eq!((code, body["status"].as_str()), (StatusCode::OK, Some("ready")));
        assert_eq!(body["all_tokens_valid"], false);
        let (code, body) = r.answer(providers(false), true);
        assert_eq!(
            (code, body["status"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("tokens_missing"))
        );
        assert_eq!(r.answer(providers(true), true).0, StatusCode::OK);
    }

    #[test]
    fn shutting_down_is_final() {
        let r = Readiness::default();
        r.warmed_up();
        r.shutting_down();
        r.warmed_up();
        let (code, body) = r.answer(providers(true), false);
        assert_eq!((code, body["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down")));
    }
}
