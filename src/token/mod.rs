//! Token sources: one cached token per provider, read lock-free on the hot path, refreshed in the
//! background ahead of expiry, with one IdP call at a time however many requests are waiting.

mod assertion;
mod canonical;
mod error;
pub mod http_api;
pub mod jwt;
pub mod oauth2;
mod per_subject;
pub mod redis;
pub mod response;
pub mod schedule;
pub mod scope;
mod send;
pub mod shared;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use error::FetchError;
pub use response::{Issued, LifetimeSource};

use crate::config::{Grant, Provider, TokenFrom};
use crate::log::LogLimit;
use crate::metrics::Metrics;
use crate::secret::Secret;

/// A token in the cache.
pub struct Token {
    /// The access token.
    pub value: Secret,
    /// `Bearer <token>`, ready to insert (marked sensitive).
    pub header: HeaderValue,
    /// Stated expiry.
    pub expires_at: Instant,
    /// Expiry as Unix time, for metrics and status.
    pub expires_unix: f64,
    /// After this the token is no longer attached (expiry minus a skew margin).
    pub usable_until: Instant,
    /// When the background refresh runs.
    pub refresh_at: Instant,
    /// Lifetime when issued.
    pub lifetime: Duration,
    /// Where the lifetime came from.
    pub lifetime_source: LifetimeSource,
    /// Granted scope.
    pub scope: Option<String>,
    /// Increases with every token this source installs.
    pub generation: u64,
    /// An upstream has accepted this token at least once: a later 401 means it was revoked.
    pub accepted: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &self.value)
            .field("lifetime", &self.lifetime)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// No token can be attached right now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token for provider {provider}: {reason}")]
pub struct Unavailable {
    /// The provider.
    pub provider: String,
    /// The last fetch error, or why none was attempted.
    pub reason: String,
    /// When the next fetch is due, for `Retry-After`.
    pub retry_in: Duration,
}

#[allow(clippy::large_enum_variant, reason = "one per provider, never moved after creation")]
enum Fetcher {
    OAuth2(oauth2::OAuth2Fetcher),
    Http(http_api::HttpFetcher),
    Static(crate::config::static_provider::StaticValue),
}

/// How long a static credential is used before its file is read again.
const STATIC_LIFETIME: Duration = Duration::from_secs(60);

impl Fetcher {
    /// A token, refused when its `token_type` is not Bearer unless `any_token_type`; `inputs`
    /// are the exchange's tokens that come from the caller or another provider.
    async fn fetch(
        &self,
        current: Option<&Token>,
        any_token_type: bool,
        inputs: &assertion::Inputs,
    ) -> Result<Issued, FetchError> {
        let issued = self.issue(current, inputs).await?;
        issued.check_token_type(any_token_type)?;
        Ok(issued)
    }

    async fn issue(&self, current: Option<&Token>, inputs: &assertion::Inputs) -> Result<Issued, FetchError> {
        match self {
            Fetcher::OAuth2(f) => f.fetch(inputs).await,
            Fetcher::Http(f) => f.fetch(current).await,
            Fetcher::Static(v) => Ok(Issued {
                access_token: v.read().map_err(FetchError::Credential)?,
                lifetime: STATIC_LIFETIME,
                lifetime_source: response::LifetimeSource::Default,
                refresh_token: None,
                scope: None,
                server_date: None,
                token_type: None,
            }),
        }
    }
}

#[derive(Default)]
struct Health {
    last_error: Option<FetchError>,
    last_success: Option<SystemTime>,
    failures: u32,
    /// Requests finding no token do not call the IdP again before this; they get 503 at once
    /// while the background task retries.
    quiet_until: Option<Instant>,
    /// Backoff for refreshes after upstream 401s of tokens no upstream ever accepted.
    rejection: Option<Rejection>,
    /// Replacements of revoked tokens that may happen now, and when that was counted: see
    /// [`REVOKED_BURST`].
    revoked_budget: Option<(f64, Instant)>,
    /// Successful fetches (IdP or shared cache) since start.
    fetched: u64,
    /// Failed fetches since start.
    failed: u64,
}

/// Minimum delay before retrying after an error that looks like a configuration problem (4xx).
const CONFIG_ERROR_RETRY: Duration = Duration::from_secs(10);

/// Longest wait between retries of a transient failure while there is no usable token (unless
/// the IdP's `Retry-After` asks for longer): requests are failing meanwhile, and one call every
/// few seconds per replica is no flood. With a token still usable the backoff grows to 30 s.
const NO_TOKEN_RETRY: Duration = Duration::from_secs(3);

/// No rejection-triggered refresh before `until`, which was `wait` after the last one.
#[derive(Clone, Copy)]
struct Rejection {
    until: Instant,
    wait: Duration,
}

/// A provider's token cache and the machinery that keeps it filled.
pub struct TokenSource {
    name: String,
    config: Provider,
    fetcher: Fetcher,
    current: ArcSwapOption<Token>,
    fetch_lock: tokio::sync::Mutex<()>,
    attempts: AtomicU64,
    generation: AtomicU64,
    health: Mutex<Health>,
    wake: Arc<Notify>,
    // Told whenever a token is installed (start-up warm-up waits on it).
    installed: Notify,
    refresher: Mutex<Option<tokio::task::AbortHandle>>,
    metrics: Metrics,
    shared: Option<(Arc<shared::SharedCache>, String)>,
    // Told when another replica stored a token in the shared cache.
    announced: Arc<Notify>,
    // Requests during a backoff look in the shared cache at most once per PEEK_EVERY.
    peeks: LogLimit,
    // Every request an upstream answers 401 while refreshes back off would log a line.
    backing_off_logs: LogLimit,
    // Tokens whose token_type is not Bearer are accepted (see `accept_any_token_type`).
    any_token_type: AtomicBool,
    // The providers whose tokens this one's exchange sends (`subject_token_provider`,
    // `actor_token_provider`), by name; weak, so a cycle of sources cannot leak.
    links: Mutex<std::collections::HashMap<String, std::sync::Weak<TokenSource>>>,
    // One exchanged token per caller subject (`subject_token: caller`).
    subjects: Option<per_subject::Subjects>,
}

/// Revoked tokens are replaced at once, [`REVOKED_BURST`] in a row, then at most
/// [`REVOKED_PER_SECOND`]. Replicas that cannot share tokens (no shared cache, or Redis down)
/// against an IdP that revokes the previous token on every issue revoke each other's tokens, and
/// would otherwise do it as fast as requests come (80 IdP calls a second in the soak).
const REVOKED_BURST: f64 = 5.0;
/// See [`REVOKED_BURST`].
const REVOKED_PER_SECOND: f64 = 5.0;

/// How often requests that find no token during a backoff look in the shared cache.
const PEEK_EVERY: Duration = Duration::from_millis(500);

impl Drop for TokenSource {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.lock().ok().and_then(|mut g| g.take()) {
            h.abort();
        }
    }
}

/// A provider's state for `/readyz`, `/tokens` and the CLI. No token values.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// `valid`, `refreshing` (a fetch is under way), `failing` (the last fetch failed) or
    /// `empty` (nothing fetched yet).
    pub state: &'static str,
    /// Successful fetches since start.
    pub fetches_ok: u64,
    /// Failed fetches since start.
    pub fetches_failed: u64,
    /// A usable token is cached.
    pub ready: bool,
    /// Seconds until the cached token expires.
    pub expires_in_seconds: Option<u64>,
    /// Unix time of the last successful fetch.
    pub last_success_unix: Option<u64>,
    /// The last fetch error (no secrets), while failing.
    pub last_error: Option<String>,
    /// Consecutive failed fetches.
    pub consecutive_failures: u32,
    /// Seconds until the next scheduled fetch: the refresh ahead of expiry, or the retry after
    /// a failure.
    pub refresh_in_seconds: Option<u64>,
    /// Caller subjects holding an exchanged token (`subject_token: caller`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subjects: Option<usize>,
}

impl TokenSource {
    /// Creates the source; nothing is fetched until [`TokenSource::start`] or [`TokenSource::get`].
    pub fn new(
        name: &str,
        config: &Provider,
        metrics: Metrics,
        shared: Option<Arc<shared::SharedCache>>,
    ) -> Result<Arc<Self>, String> {
        let fetcher = match config {
            Provider::OAuth2(p) => {
                let http = send::client(&p.common).map_err(|e| format!("provider {name}: {e}"))?;
                Fetcher::OAuth2(oauth2::OAuth2Fetcher::new(name, p.clone(), http))
            }
            Provider::Http(p) => {
                let http = send::client(&p.common).map_err(|e| format!("provider {name}: {e}"))?;
                Fetcher::Http(http_api::HttpFetcher::new(name, p.clone(), http))
            }
            Provider::Static(p) => Fetcher::Static(p.value.clone()),
        };
        // A static credential has no IdP to spare: nothing to share.
        let shared = shared.filter(|_| !matches!(config, Provider::Static(_)));
        Ok(Arc::new(TokenSource {
            name: name.to_owned(),
            config: config.clone(),
            fetcher,
            current: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            wake: Arc::new(Notify::new()),
            installed: Notify::new(),
            refresher: Mutex::new(None),
            metrics,
            shared: shared.map(|s| {
                let key = s.provider_key(name, &canonical::encode(config));
                (s, key)
            }),
            announced: Arc::new(Notify::new()),
            peeks: LogLimit::every(PEEK_EVERY),
            backing_off_logs: LogLimit::default(),
            any_token_type: AtomicBool::new(false),
            links: Mutex::new(std::collections::HashMap::new()),
            subjects: per_subject::Subjects::for_provider(config),
        }))
    }

    /// The tokens of other providers this one's exchange sends, current (fetched if need be).
    async fn chained_inputs(&self) -> Result<assertion::Inputs, FetchError> {
        let Provider::OAuth2(p) = &self.config else { return Ok(assertion::Inputs::default()) };
        let Grant::TokenExchange(x) = &p.grant else { return Ok(assertion::Inputs::default()) };
        let linked = |what: &'static str, from: &TokenFrom| {
            let name = match from {
                TokenFrom::Provider(name) => Some(name.clone()),
                _ => None,
            };
            let source = name.as_ref().and_then(|n| self.links.lock().ok()?.get(n)?.upgrade());
            async move {
                let Some(name) = name else { return Ok(None) };
                let source = source.ok_or_else(|| {
                    FetchError::Credential(format!("{what}: provider {name} is not running"))
                })?;
                let token = linked_token(source).await.map_err(|e| {
                    FetchError::Credential(format!("{what}: provider {name} has no token: {}", e.reason))
                })?;
                Ok::<_, FetchError>(Some(token.value.clone()))
            }
        };
        let subject = linked("subject_token_provider", &x.subject.from).await?;
        let actor = match &x.actor {
            Some(a) => linked("actor_token_provider", &a.from).await?,
            None => None,
        };
        Ok(assertion::Inputs { subject, actor })
    }

    /// Points this source's exchange at the sources it takes tokens from (a chain of them:
    /// each waits for the next one's token).
    pub fn link(&self, providers: &Providers) {
        if let Ok(mut links) = self.links.lock() {
            *links = providers.iter().map(|(n, s)| (n.clone(), Arc::downgrade(s))).collect();
        }
    }

    /// Accepts tokens whose `token_type` is not Bearer, when every route using this source says
    /// in `inject` how to send them ([`crate::config::Config::any_token_type`]). Set before the
    /// first fetch, and again by each reload that keeps the source.
    pub fn accept_any_token_type(&self, yes: bool) {
        self.any_token_type.store(yes, Ordering::Relaxed);
    }

    /// The provider name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its tokens expire (a static credential does not: it is only read again).
    pub fn expires(&self) -> bool {
        !matches!(self.config, Provider::Static(_))
    }

    /// The configuration this source was built from.
    pub fn config(&self) -> &Provider {
        &self.config
    }

    /// Starts the background task: an eager first fetch, then refreshes ahead of expiry and
    /// retries with backoff. It stops when the source is dropped.
    /// Calling it again (a source shared by several provider names) does nothing.
    pub fn start(self: &Arc<Self>) {
        // Tokens exchanged for callers are fetched when a caller comes.
        if self.per_subject() {
            return;
        }
        let Ok(mut g) = self.refresher.lock() else { return };
        if g.is_none() {
            if let Some((cache, key)) = &self.shared {
                cache.listen(key, &self.announced);
            }
            let wakes = (self.wake.clone(), self.announced.clone());
            let handle = tokio::spawn(refresh_loop(Arc::downgrade(self), wakes));
            *g = Some(handle.abort_handle());
        }
    }

    /// The cached token if it is still usable. Lock-free.
    pub fn usable(&self) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if Instant::now() < t.usable_until => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// Returns once a usable token is cached (at once if one is); fetches nothing itself.
    pub async fn wait_usable(&self) {
        if self.per_subject() {
            return;
        }
        loop {
            let installed = self.installed.notified();
            tokio::pin!(installed);
            // Registered before the check, so an install in between is not missed.
            installed.as_mut().enable();
            if self.usable().is_some() {
                return;
            }
            installed.await;
        }
    }

    /// A usable token: the cached one, or one fetched now. Concurrent callers share one fetch;
    /// after a failure, callers get an error at once until the retry delay has passed.
    pub async fn get(&self) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        if self.backing_off() {
            // Another replica may have a token already: no need to wait out the backoff.
            return self.adopt_shared(true).await.ok_or_else(|| self.unavailable());
        }
        self.fetch(false).await
    }

    /// After a failure, requests get an answer at once until the retry delay has passed.
    fn backing_off(&self) -> bool {
        let quiet = self.health.lock().ok().and_then(|h| h.quiet_until);
        quiet.is_some_and(|q| Instant::now() < q)
    }

    /// [`TokenSource::get`], waiting at most `wait` for a fetch (an IdP that hangs instead of
    /// refusing): then `Unavailable` with a retry in a second, while the fetch goes on.
    pub async fn get_within(self: &Arc<Self>, wait: Duration) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let waited = if self.backing_off() {
            // No fetch is awaited (at most a bounded look in the shared cache): no task either.
            tokio::time::timeout(wait, self.get()).await
        } else {
            // The fetch runs in a task of its own, so it goes on when this request stops waiting.
            let me = Arc::clone(self);
            let fetch = tokio::spawn(async move { me.get().await });
            tokio::time::timeout(wait, async {
                fetch.await.unwrap_or_else(|_panicked| Err(self.unavailable()))
            })
            .await
        };
        waited.unwrap_or_else(|_| {
            Err(Unavailable {
                provider: self.name.clone(),
                reason: format!("the identity provider has not answered within {} ms", wait.as_millis()),
                retry_in: Duration::from_secs(1),
            })
        })
    }

    /// Installs a token another replica stored in the shared cache, if it is newer than ours.
    /// `limited`: at most one look per [`PEEK_EVERY`] (requests during an outage would each
    /// look).
    async fn adopt_shared(&self, limited: bool) -> Option<Arc<Token>> {
        let (cache, key) = self.shared.as_ref()?;
        if limited && self.peeks.admit().is_none() {
            return None;
        }
        let current = self.current.load_full();
        let margin = self.config.common().refresh_margin;
        let issued = cache.peek(key, current.as_ref().map(|t| &t.value), margin).await?;
        self.metrics.token_fetches.with_label_values(&[&self.name, "shared_cache"]).inc();
        Some(self.install(issued, Instant::now()))
    }

    /// One fetch straight from the IdP, bypassing the cache and the shared cache, with nothing
    /// recorded: `check --live` reports what it got.
    pub async fn fetch_once(&self) -> Result<Issued, FetchError> {
        let inputs = self.chained_inputs().await?;
        self.fetcher.fetch(None, self.any_token_type.load(Ordering::Relaxed), &inputs).await
    }

    /// Fetches a new token even if the cached one is usable (unless another fetch finished while
    /// waiting for the lock).
    pub async fn refresh(&self) -> Result<Arc<Token>, Unavailable> {
        self.fetch(true).await
    }

    async fn fetch(&self, force: bool) -> Result<Arc<Token>, Unavailable> {
        let seen = self.attempts.load(Ordering::Acquire);
        let _flight = self.fetch_lock.lock().await;
        if self.attempts.load(Ordering::Acquire) != seen {
            // Someone else fetched while this caller waited: share the outcome.
            return self.usable().ok_or_else(|| self.unavailable());
        }
        if !force && let Some(t) = self.usable() {
            return Ok(t);
        }
        self.fetch_locked().await
    }

    /// Records that an upstream accepted `token`: from now on a 401 for it means revocation.
    /// Costs one relaxed load once a token is known good.
    pub fn confirm(&self, token: &Token) {
        if !token.accepted.load(Ordering::Relaxed) {
            token.accepted.store(true, Ordering::Relaxed);
            if let Ok(mut h) = self.health.lock() {
                h.rejection = None;
            }
        }
    }

    /// Replaces a token the upstream rejected (401). Returns a different token to replay with:
    /// one that replaced it meanwhile (another request's refresh, a renewal), or a fresh one.
    ///
    /// A token an upstream accepted before was revoked: it is replaced at once. A token no
    /// upstream ever accepted points at the scopes or audience, which a new token rarely cures:
    /// such refreshes back off ([`schedule::rejection_backoff`]: 5 s doubling to 5 min), so an
    /// upstream that rejects every token cannot make tokengate flood the IdP. Either way a burst
    /// of 401s for one token causes one IdP call.
    pub async fn replace_rejected(&self, rejected: &Token) -> Option<Arc<Token>> {
        let newer = |t: &Arc<Token>| t.generation != rejected.generation;
        if let Some(t) = self.usable().filter(newer) {
            return Some(t);
        }
        let _flight = self.fetch_lock.lock().await;
        if let Some(t) = self.usable().filter(newer) {
            return Some(t);
        }
        let revoked = rejected.accepted.load(Ordering::Relaxed);
        if revoked {
            let mut h = self.health.lock().ok()?;
            let now = Instant::now();
            let (budget, at) = h.revoked_budget.unwrap_or((REVOKED_BURST, now));
            let budget =
                (budget + now.duration_since(at).as_secs_f64() * REVOKED_PER_SECOND).min(REVOKED_BURST);
            if budget < 1.0 {
                return None;
            }
            h.revoked_budget = Some((budget - 1.0, now));
        } else {
            let mut h = self.health.lock().ok()?;
            let now = Instant::now();
            if let Some(r) = h.rejection.filter(|r| now < r.until) {
                if let Some(suppressed) = self.backing_off_logs.admit() {
                    tracing::warn!(provider = %self.name, retry_in_s = r.until.duration_since(now).as_secs(), suppressed, "upstream rejected a token it never accepted; not refreshing yet (check the scopes and audience)");
                }
                return None;
            }
            let wait = schedule::rejection_backoff(h.rejection.map(|r| r.wait));
            h.rejection = Some(Rejection { until: now + wait, wait });
        }
        tracing::info!(provider = %self.name, generation = rejected.generation, revoked, "upstream rejected the token; fetching a new one");
        self.fetch_locked().await.ok().filter(newer)
    }

    /// Calls the IdP; the caller holds `fetch_lock`.
    async fn fetch_locked(&self) -> Result<Arc<Token>, Unavailable> {
        let started = Instant::now();
        let current = self.current.load_full();
        // When the token request itself went out: the lifetime counts from then, not from when
        // the answer was installed (a slow IdP or a stalled shared cache in between).
        let sent = Mutex::new(started);
        let inputs = self.chained_inputs().await;
        let fetch = || {
            if let Ok(mut s) = sent.lock() {
                *s = Instant::now();
            }
            let (current, inputs) = (current.as_deref(), inputs.clone());
            async move { self.fetcher.fetch(current, self.any_token_type.load(Ordering::Relaxed), &inputs?).await }
        };
        let result = match &self.shared {
            None => fetch().await.map(|i| (i, true)),
            Some((cache, key)) => {
                let margin = self.config.common().refresh_margin;
                match cache.fetch(key, current.as_ref().map(|t| &t.value), margin, fetch).await {
                    Ok(shared::Shared::Hit(i)) => Ok((i, false)),
                    Ok(shared::Shared::Fetched(i)) => Ok((i, true)),
                    Err(e) => Err(e),
                }
            }
        };
        self.metrics
            .token_fetch_duration
            .with_label_values(&[&self.name])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok((issued, from_idp)) => {
                let result = if from_idp { "success" } else { "shared_cache" };
                self.metrics.token_fetches.with_label_values(&[&self.name, result]).inc();
                let sent = sent.lock().map_or(started, |s| *s);
                Ok(self.install(issued, if from_idp { sent } else { Instant::now() }))
            }
            Err(e) => {
                self.metrics.token_fetches.with_label_values(&[self.name.as_str(), &e.label()]).inc();
                if e.is_transient() {
                    tracing::warn!(provider = %self.name, error = %e, "token fetch failed; will retry");
                } else {
                    tracing::error!(provider = %self.name, error = %e, "token fetch failed; check the provider configuration");
                }
                if let Ok(mut h) = self.health.lock() {
                    h.failures += 1;
                    h.failed += 1;
                    let mut delay = schedule::backoff(h.failures, rand::random(), e.retry_after());
                    if !e.is_transient() {
                        // A wrong secret or scope does not fix itself: retry slowly.
                        delay = delay.max(CONFIG_ERROR_RETRY);
                    } else if e.retry_after().is_none() && self.usable().is_none() {
                        // An outage that has taken the token: notice its end within seconds.
                        delay = delay.min(NO_TOKEN_RETRY);
                    }
                    h.quiet_until = Some(Instant::now() + delay);
                    h.last_error = Some(e);
                }
                self.usable().ok_or_else(|| self.unavailable())
            }
        };
        self.attempts.fetch_add(1, Ordering::Release);
        outcome
    }

    /// Installs `issued`, whose request went out at `sent`. It expires `lifetime` after `sent`, or
    /// at its JWT `exp` if that is sooner.
    fn install(&self, issued: Issued, sent: Instant) -> Arc<Token> {
        let (token, refresh_in, issued_lifetime) = self.mint(issued, sent);
        let (expires_unix, generation) = (token.expires_unix, token.generation);
        self.current.store(Some(Arc::clone(&token)));
        self.installed.notify_waiters();
        self.metrics.token_expiry.with_label_values(&[&self.name]).set(expires_unix);
        let refresh_unix = SystemTime::now()
            .checked_add(refresh_in)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.token_refresh.with_label_values(&[&self.name]).set(refresh_unix);
        if let Ok(mut h) = self.health.lock() {
            *h = Health {
                last_success: Some(SystemTime::now()),
                rejection: h.rejection,
                revoked_budget: h.revoked_budget,
                fetched: h.fetched + 1,
                failed: h.failed,
                ..Health::default()
            };
        }
        if let Provider::OAuth2(p) = &self.config
            && let scope::Granted::Missing { missing, .. } =
                scope::granted(&p.scopes, token.scope.as_deref(), token.value.expose())
        {
            tracing::warn!(provider = %self.name, missing = %missing.join(" "), "the IdP did not grant every requested scope; requests needing them will be refused upstream");
        }
        if matches!(self.config, Provider::Static(_)) {
            // Read again every minute: not news.
            tracing::debug!(provider = %self.name, generation, "static credential read");
        } else {
            tracing::info!(
                provider = %self.name,
                lifetime_s = issued_lifetime.as_secs(),
                refresh_in_s = refresh_in.as_secs(),
                generation,
                "token obtained"
            );
        }
        token
    }

    /// A token from what the IdP issued, its request sent at `sent`; with when to refresh it
    /// and the lifetime as issued.
    fn mint(&self, issued: Issued, sent: Instant) -> (Arc<Token>, Duration, Duration) {
        let now = Instant::now();
        let mut expires_at = sent + issued.lifetime;
        let mut shortened = false;
        if let Some(exp) = jwt::expiry(issued.access_token.expose()) {
            let left = exp - SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            // `exp` counts whole seconds: only a difference beyond that resolution counts.
            let by_exp = now + Duration::from_secs_f64(left.clamp(0.0, 1e9));
            if left.is_finite() && left >= 1.0 && by_exp + Duration::from_secs(1) < expires_at {
                expires_at = by_exp;
                shortened = true;
            }
        }
        // What is left of it, which schedules the refresh; the margin follows the whole lifetime.
        let lifetime = expires_at.saturating_duration_since(now).max(Duration::from_secs(1));
        let margin = schedule::refresh_margin(issued.lifetime, self.config.common().refresh_margin);
        let refresh_in = lifetime.saturating_sub(margin + schedule::jitter(margin, rand::random()));
        let expires_unix = SystemTime::now()
            .checked_add(lifetime)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let mut header = HeaderValue::from_str(&format!("Bearer {}", issued.access_token.expose()))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        header.set_sensitive(true);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let issued_lifetime = issued.lifetime;
        let token = Arc::new(Token {
            value: issued.access_token,
            header,
            expires_at: now + lifetime,
            expires_unix,
            usable_until: now + lifetime.saturating_sub(schedule::expiry_skew(lifetime)),
            refresh_at: now + refresh_in,
            // As issued, unless the JWT's own exp cut it short.
            lifetime: if shortened { lifetime } else { issued.lifetime },
            lifetime_source: issued.lifetime_source,
            scope: issued.scope,
            generation,
            accepted: std::sync::atomic::AtomicBool::new(false),
        });
        (token, refresh_in, issued_lifetime)
    }

    fn unavailable(&self) -> Unavailable {
        let health = self.health.lock().ok();
        let reason = health
            .as_ref()
            .and_then(|h| h.last_error.as_ref().map(ToString::to_string))
            .unwrap_or_else(|| "no token has been obtained yet".into());
        let retry_in = health
            .as_ref()
            .and_then(|h| h.quiet_until)
            .map_or(Duration::ZERO, |q| q.saturating_duration_since(Instant::now()));
        Unavailable { provider: self.name.clone(), reason, retry_in }
    }

    /// State for health endpoints.
    pub fn status(&self) -> Status {
        let token = self.usable();
        let h = self.health.lock();
        let (last_error, last_success, failures, fetched, failed, retry_at) = match &h {
            Ok(h) => (
                h.last_error.as_ref().map(ToString::to_string),
                h.last_success,
                h.failures,
                h.fetched,
                h.failed,
                h.quiet_until.filter(|_| h.failures > 0),
            ),
            Err(_) => (None, None, 0, 0, 0, None),
        };
        let now = Instant::now();
        let next = retry_at.or_else(|| self.current.load().as_ref().map(|t| t.refresh_at));
        let state = if let Some(subjects) = &self.subjects {
            return Status {
                state: "per_caller",
                fetches_ok: 0,
                fetches_failed: 0,
                ready: true,
                expires_in_seconds: None,
                last_success_unix: None,
                last_error: None,
                consecutive_failures: 0,
                refresh_in_seconds: None,
                subjects: Some(subjects.len()),
            };
        } else if self.fetch_lock.try_lock().is_err() {
            "refreshing"
        } else if failures > 0 {
            "failing"
        } else if token.is_some() {
            "valid"
        } else {
            "empty"
        };
        Status {
            state,
            fetches_ok: fetched,
            fetches_failed: failed,
            ready: token.is_some(),
            expires_in_seconds: token
                .map(|t| t.expires_at.saturating_duration_since(Instant::now()).as_secs()),
            last_success_unix: last_success
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            last_error,
            consecutive_failures: failures,
            refresh_in_seconds: next.map(|t| t.saturating_duration_since(now).as_secs()),
            subjects: None,
        }
    }

    /// It can serve its routes: it has a token, or its tokens are exchanged per caller.
    pub fn ready(&self) -> bool {
        self.per_subject() || self.usable().is_some()
    }
}

async fn refresh_loop(weak: Weak<TokenSource>, (wake, announced): (Arc<Notify>, Arc<Notify>)) {
    loop {
        let delay = {
            let Some(source) = weak.upgrade() else { return };
            let now = Instant::now();
            let retry_at = source.health.lock().ok().and_then(|h| h.quiet_until.filter(|_| h.failures > 0));
            let due = source.current.load().as_ref().map_or(now, |t| t.refresh_at);
            // After a failure, retry when the backoff says so, even if the token is still usable.
            retry_at.unwrap_or(due).saturating_duration_since(now)
        };
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = wake.notified() => {}
                () = announced.notified() => {
                    // Another replica stored a token: switch to it at once.
                    if let Some(source) = weak.upgrade() {
                        source.adopt_shared(false).await;
                    }
                    continue;
                }
            }
        }
        let Some(source) = weak.upgrade() else { return };
        let due = source.current.load().as_ref().is_none_or(|t| Instant::now() >= t.refresh_at);
        if due {
            // Errors are recorded (and logged) inside; the next round computes the retry delay.
            let _ = source.refresh().await;
        }
    }
}

/// All providers of a configuration, by name.
pub type Providers = std::collections::BTreeMap<String, Arc<TokenSource>>;

/// Another source's token for an exchange, boxed: sources that take each other's tokens make
/// the future recursive.
fn linked_token(
    source: Arc<TokenSource>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<Token>, Unavailable>> + Send>> {
    Box::pin(async move { source.get_within(Duration::from_secs(5)).await })
}

/// Sets for every source whether it accepts tokens that are not Bearer: only if every route of
/// every provider name that shares it says how to send them.
pub fn settle_token_types(config: &crate::config::Config, providers: &Providers) {
    for source in providers.values() {
        source.link(providers);
        let names = providers.iter().filter(|(_, s)| Arc::ptr_eq(s, source)).map(|(n, _)| n);
        source.accept_any_token_type(names.into_iter().all(|n| config.any_token_type(n)));
    }
}

/// The shared cache of a configuration, if it has one.
pub fn shared_cache(config: &crate::config::Config) -> Result<Option<Arc<shared::SharedCache>>, String> {
    config.shared_cache.as_ref().map(|c| shared::SharedCache::new(c).map(Arc::new)).transpose()
}
