//! When to refresh a token and when to stop using it: pure functions of its lifetime.

use std::time::Duration;

/// How long before expiry the background refresh runs: `configured`, or 10 % of the lifetime
/// clamped to 10 s..5 min; never more than half the lifetime.
///
/// A 300 s Corti token refreshes at 270 s, a 3600 s CoreView token at 3300 s, a 7-day Screening
/// Eagle token 5 min before expiry (not 16.8 h), a 2 s test token at 1 s.
pub fn refresh_margin(lifetime: Duration, configured: Option<Duration>) -> Duration {
    let default = (lifetime / 10).clamp(Duration::from_secs(10), Duration::from_secs(300));
    configured.unwrap_or(default).min(lifetime / 2)
}

/// Random part of the schedule: up to a tenth of the margin earlier, so replicas started
/// together do not all call the IdP in the same second.
pub fn jitter(margin: Duration, unit_random: f64) -> Duration {
    margin.mul_f64(unit_random.clamp(0.0, 1.0) / 10.0)
}

/// How long before its stated expiry a token is no longer attached to requests: covers clock
/// skew and the time a request spends in flight. 5 s, or a tenth of short lifetimes.
pub fn expiry_skew(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(5))
}

/// Delay before retry `attempt` (1-based) after a failed fetch: exponential from 250 ms, capped
/// at 30 s, with "equal jitter" (half fixed, half random), and never shorter than `retry_after`.
pub fn backoff(attempt: u32, unit_random: f64, retry_after: Option<Duration>) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let capped = base.min(Duration::from_secs(30));
    let delay = capped / 2 + (capped / 2).mul_f64(unit_random.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => delay.max(ra.min(Duration::from_secs(300))),
        None => delay,
    }
}

/// After an upstream rejects a token it never accepted, how long before another such rejection
/// may refresh: 5 s, doubling after each one up to 5 min (`previous` is the last wait). Rejected
/// fresh tokens point at the scopes or audience, which a new token rarely cures.
pub fn rejection_backoff(previous: Option<Duration>) -> Duration {
    previous.map_or(Duration::from_secs(5), |p| p.saturating_mul(2).min(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refresh_policy_matches_the_provider_expectations() {
        assert_eq!(refresh_margin(S(300), None), S(30));
        assert_eq!(refresh_margin(S(3600), None), S(300));
        assert_eq!(refresh_margin(S(604_800), None), S(300));
        assert_eq!(refresh_margin(S(900), None), S(90));
        assert_eq!(refresh_margin(S(2), None), S(1));
        assert_eq!(refresh_margin(S(30), None), S(10));
        assert_eq!(refresh_margin(S(3600), Some(S(60))), S(60));
        assert_eq!(refresh_margin(S(60), Some(S(600))), S(30));
    }

    #[test]
    fn skew_and_jitter_stay_small() {
        assert_eq!(expiry_skew(S(3600)), S(5));
        assert_eq!(expiry_skew(S(2)), Duration::from_millis(200));
        assert_eq!(jitter(S(30), 1.0), S(3));
        assert_eq!(jitter(S(30), 0.0), S(0));
    }

    #[test]
    fn rejection_backoff_doubles_from_5s_to_5min() {
        let mut waits = vec![rejection_backoff(None)];
        for _ in 0..8 {
            waits.push(rejection_backoff(waits.last().copied()));
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300].map(S));
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        assert_eq!(backoff(1, 0.0, None), Duration::from_millis(125));
        assert_eq!(backoff(1, 1.0, None), Duration::from_millis(250));
        assert_eq!(backoff(3, 1.0, None), S(1));
        assert_eq!(backoff(30, 1.0, None), S(30));
        assert_eq!(backoff(1, 0.0, Some(S(7))), S(7));
    }
}
