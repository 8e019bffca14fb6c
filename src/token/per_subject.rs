//! Tokens exchanged for the caller (`token_exchange: { subject_token: caller }`): one per caller
//! subject, never shared across subjects, at most [`MAX_SUBJECTS`] held (the least recently used
//! goes first, and expired ones before it), one exchange at a time per subject, and refreshed
//! ahead of expiry by the request that finds it due.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use super::{Token, TokenSource, Unavailable};
use crate::config::{Grant, Provider, TokenFrom};
use crate::secret::Secret;

/// Subjects held at most per provider.
pub const MAX_SUBJECTS: usize = 10_000;

/// The exchanged tokens of one provider, by subject.
pub struct Subjects {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    epoch: Instant,
}

struct Slot {
    current: ArcSwapOption<Token>,
    // One exchange at a time for this subject (owned guards: a background refresh holds it).
    exchange: Arc<tokio::sync::Mutex<()>>,
    // Last use, in milliseconds since `Subjects::epoch`, for eviction.
    used: AtomicU64,
}

impl Subjects {
    /// Some for a provider whose exchange sends the caller's token.
    pub fn for_provider(config: &Provider) -> Option<Subjects> {
        let Provider::OAuth2(p) = config else { return None };
        let Grant::TokenExchange(x) = &p.grant else { return None };
        (x.subject.from == TokenFrom::Caller)
            .then(|| Subjects { slots: Mutex::new(HashMap::new()), epoch: Instant::now() })
    }

    /// Subjects held now.
    pub fn len(&self) -> usize {
        self.slots.lock().map_or(0, |s| s.len())
    }

    /// The slot of `subject`, made (evicting one if full) when there is none.
    fn slot(&self, subject: &str) -> Arc<Slot> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let Ok(mut slots) = self.slots.lock() else {
            return Arc::new(Slot::new(now));
        };
        if let Some(s) = slots.get(subject) {
            s.used.store(now, Ordering::Relaxed);
            return s.clone();
        }
        if slots.len() >= MAX_SUBJECTS {
            let expired: Vec<String> = slots
                .iter()
                .filter(|(_, s)| s.current.load().as_ref().is_none_or(|t| Instant::now() >= t.usable_until))
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                slots.remove(&k);
            }
            if slots.len() >= MAX_SUBJECTS
                && let Some(oldest) =
                    slots.iter().min_by_key(|(_, s)| s.used.load(Ordering::Relaxed)).map(|(k, _)| k.clone())
            {
                slots.remove(&oldest);
            }
        }
        let slot = Arc::new(Slot::new(now));
        slots.insert(subject.to_owned(), slot.clone());
        slot
    }
}

impl Slot {
    fn new(now: u64) -> Slot {
        Slot { current: ArcSwapOption::empty(), exchange: Arc::default(), used: AtomicU64::new(now) }
    }

    fn usable(&self) -> Option<Arc<Token>> {
        self.current.load_full().filter(|t| Instant::now() < t.usable_until)
    }
}

impl TokenSource {
    /// Whether this source exchanges the caller's token (one token per caller subject).
    pub fn per_subject(&self) -> bool {
        self.subjects.is_some()
    }

    /// The token exchanged for `subject` (the caller's issuer and subject), exchanging
    /// `subject_token` (the caller's validated JWT) when none is usable. A token due for
    /// refresh is used while a new one is fetched in the background.
    pub async fn for_subject(
        self: &Arc<Self>,
        subject: &str,
        subject_token: &Secret,
    ) -> Result<Arc<Token>, Unavailable> {
        let Some(subjects) = &self.subjects else { return self.get().await };
        let slot = subjects.slot(subject);
        if let Some(t) = slot.usable() {
            if Instant::now() >= t.refresh_at
                && let Ok(guard) = slot.exchange.clone().try_lock_owned()
            {
                let (source, slot, token) = (self.clone(), slot.clone(), subject_token.clone());
                tokio::spawn(async move {
                    let _held = guard;
                    if let Ok(fresh) = source.exchange_for(&token).await {
                        slot.current.store(Some(fresh));
                    }
                });
            }
            return Ok(t);
        }
        let _one = slot.exchange.lock().await;
        if let Some(t) = slot.usable() {
            return Ok(t);
        }
        let fresh = self.exchange_for(subject_token).await.map_err(|e| Unavailable {
            provider: self.name.clone(),
            reason: e.to_string(),
            retry_in: std::time::Duration::ZERO,
        })?;
        slot.current.store(Some(fresh.clone()));
        Ok(fresh)
    }

    /// Forgets `subject`'s token after the upstream refused it.
    pub fn forget_subject(&self, subject: &str) {
        if let Some(s) = &self.subjects
            && let Ok(mut slots) = s.slots.lock()
        {
            slots.remove(subject);
        }
    }

    async fn exchange_for(&self, subject_token: &Secret) -> Result<Arc<Token>, super::FetchError> {
        let started = Instant::now();
        let mut inputs = self.chained_inputs().await?;
        inputs.subject = Some(subject_token.clone());
        let result = self.fetcher.fetch(None, self.any_token_type.load(Ordering::Relaxed), &inputs).await;
        self.metrics
            .token_fetch_duration
            .with_label_values(&[&self.name])
            .observe(started.elapsed().as_secs_f64());
        let label = if result.is_ok() {
            "success".into()
        } else {
            result.as_ref().err().map(|e| e.label()).unwrap_or_default()
        };
        self.metrics.token_fetches.with_label_values(&[self.name.as_str(), label.as_ref()]).inc();
        Ok(self.mint(result?, started).0)
    }
}
