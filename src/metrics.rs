//! The Prometheus metrics tokengate exports. Labels never carry a token, secret or client input
//! beyond the route label, a normalised method and the status code.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All metric handles, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    /// `tokengate_requests_total{route,method,status}`.
    pub requests: IntCounterVec,
    /// `tokengate_request_duration_seconds{route}`: until the response head is sent.
    pub request_duration: HistogramVec,
    /// `tokengate_upstream_errors_total{route,kind}`.
    pub upstream_errors: IntCounterVec,
    /// `tokengate_upstream_401_total{route,outcome}`: upstream 401 answers and what followed.
    pub upstream_401: IntCounterVec,
    /// `tokengate_denied_total{route,reason}`: requests refused by access control.
    pub denied: IntCounterVec,
    /// `tokengate_token_fetches_total{provider,result}`.
    pub token_fetches: IntCounterVec,
    /// `tokengate_token_fetch_duration_seconds{provider}`.
    pub token_fetch_duration: HistogramVec,
    /// `tokengate_token_expiry_timestamp_seconds{provider}`.
    pub token_expiry: GaugeVec,
    /// `tokengate_token_refresh_timestamp_seconds{provider}`: when the current token is due to be
    /// replaced; a time in the past that does not move means refreshes are failing.
    pub token_refresh: GaugeVec,
    /// `tokengate_inflight_requests`.
    pub inflight: IntGauge,
    /// `tokengate_connections_closed_total{listener,reason}`: connections tokengate closed itself.
    pub connections_closed: IntCounterVec,
    /// `tokengate_caller_requests_total{route,caller,status}`: requests by caller, when
    /// callers are configured (`_unknown` for none of them).
    pub caller_requests: IntCounterVec,
    /// `tokengate_websocket_tunnels{route}`: WebSocket tunnels open.
    pub websocket_open: IntGaugeVec,
    /// `tokengate_websocket_closed_total{route,reason}`: WebSocket tunnels ended, and why.
    pub websocket_closed: IntCounterVec,
    /// `tokengate_access_log_lines_total`: access-log lines written.
    pub access_log_lines: prometheus::IntCounter,
    /// `tokengate_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub access_log_dropped: prometheus::IntCounter,
    /// `tokengate_config_reloads_total{result}`: reloads (SIGHUP, `POST /reload`, a changed
    /// file), `success` or `failure`.
    pub config_reloads: IntCounterVec,
    /// `tokengate_build_info{version}`.
    pub build_info: IntGaugeVec,
    /// `tokengate_up`: a constant 1 proving the scrape reached the process.
    pub up: Gauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency_buckets =
            vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let requests = IntCounterVec::new(
            Opts::new("tokengate_requests_total", "Requests answered, by route, method and status."),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tokengate_request_duration_seconds",
                "Time from request arrival until the response head is sent, by route.",
            )
            .buckets(latency_buckets.clone()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new("tokengate_upstream_errors_total", "Upstream failures, by route and kind."),
            &["route", "kind"],
        )
        .expect("valid metric");
        let upstream_401 = IntCounterVec::new(
            Opts::new(
                "tokengate_upstream_401_total",
                "Upstream 401 answers, by route and outcome (replayed, not_replayable, no_new_token).",
            ),
            &["route", "outcome"],
        )
        .expect("valid metric");
        let denied = IntCounterVec::new(
            Opts::new("tokengate_denied_total", "Requests refused by access control, by route and reason."),
            &["route", "reason"],
        )
        .expect("valid metric");
        let token_fetches = IntCounterVec::new(
            Opts::new(
                "tokengate_token_fetches_total",
                "Token requests to identity providers, by provider and result.",
            ),
            &["provider", "result"],
        )
        .expect("valid metric");
        let token_fetch_duration = HistogramVec::new(
            HistogramOpts::new(
                "tokengate_token_fetch_duration_seconds",
                "Duration of token requests, by provider.",
            )
            .buckets(latency_buckets),
            &["provider"],
        )
        .expect("valid metric");
        let token_expiry = GaugeVec::new(
            Opts::new(
                "tokengate_token_expiry_timestamp_seconds",
                "Unix time at which the current token of each provider expires.",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let token_refresh = GaugeVec::new(
            Opts::new(
                "tokengate_token_refresh_timestamp_seconds",
                "Unix time at which the current token of each provider is due to be refreshed.",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let inflight =
            IntGauge::new("tokengate_inflight_requests", "Requests waiting for an upstream response head.")
                .expect("valid metric");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "tokengate_connections_closed_total",
                "Downstream connections tokengate closed itself, by listener and reason \
                 (first_request_timeout, header_timeout, idle, evicted, send_timeout).",
            ),
            &["listener", "reason"],
        )
        .expect("valid metric");
        let caller_requests = IntCounterVec::new(
            Opts::new(
                "tokengate_caller_requests_total",
                "Requests answered by route, caller (_unknown: none) and status, when callers are configured.",
            ),
            &["route", "caller", "status"],
        )
        .expect("valid metric");
        let websocket_open = IntGaugeVec::new(
            Opts::new("tokengate_websocket_tunnels", "WebSocket tunnels open, by route."),
            &["route"],
        )
        .expect("valid metric");
        let websocket_closed = IntCounterVec::new(
            Opts::new(
                "tokengate_websocket_closed_total",
                "WebSocket tunnels ended, by route and reason (client, upstream, idle, lifetime, draining, error).",
            ),
            &["route", "reason"],
        )
        .expect("valid metric");
        let access_log_lines =
            prometheus::IntCounter::new("tokengate_access_log_lines_total", "Access-log lines written.")
                .expect("valid metric");
        let access_log_dropped = prometheus::IntCounter::new(
            "tokengate_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind (requests are never made to wait).",
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "tokengate_config_reloads_total",
                "Configuration reloads by result (success, failure: the previous configuration stays).",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        let build_info =
            IntGaugeVec::new(Opts::new("tokengate_build_info", "Build information; always 1."), &["version"])
                .expect("valid metric");
        let up = Gauge::new("tokengate_up", "1 while tokengate is running.").expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let mut names = Vec::new();
        up.set(1.0);
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(upstream_401.clone()),
            Box::new(denied.clone()),
            Box::new(token_fetches.clone()),
            Box::new(token_fetch_duration.clone()),
            Box::new(token_expiry.clone()),
            Box::new(token_refresh.clone()),
            Box::new(inflight.clone()),
            Box::new(connections_closed.clone()),
            Box::new(caller_requests.clone()),
            Box::new(websocket_open.clone()),
            Box::new(websocket_closed.clone()),
            Box::new(access_log_lines.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(config_reloads.clone()),
            Box::new(build_info.clone()),
            Box::new(up.clone()),
        ] {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("metric names are unique");
        }
        let log = LogDropped::new();
        names.extend(prometheus::core::Collector::desc(&log).iter().map(|d| d.fq_name.clone()));
        registry.register(Box::new(log)).expect("metric names are unique");
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...: the
        // names every Prometheus client library exports, read from /proc at scrape time.
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            names.extend(prometheus::core::Collector::desc(&process).iter().map(|d| d.fq_name.clone()));
            registry.register(Box::new(process)).expect("metric names are unique");
        }
        Metrics {
            registry,
            names,
            requests,
            request_duration,
            upstream_errors,
            upstream_401,
            denied,
            token_fetches,
            token_fetch_duration,
            token_expiry,
            token_refresh,
            inflight,
            connections_closed,
            caller_requests,
            websocket_open,
            websocket_closed,
            access_log_lines,
            access_log_dropped,
            config_reloads,
            build_info,
            up,
        }
    }

    /// Requests answered by (route, caller), since start.
    pub fn caller_totals(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut out = std::collections::BTreeMap::new();
        for family in prometheus::core::Collector::collect(&self.caller_requests) {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_owned())
                };
                let (Some(route), Some(caller)) = (label("route"), label("caller")) else { continue };
                *out.entry((route, caller)).or_default() += m.get_counter().get_value() as u64;
            }
        }
        out
    }

    /// Requests answered and those answered 5xx, by route label, since start.
    pub fn route_totals(&self) -> std::collections::HashMap<String, (u64, u64)> {
        let mut out: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
        for family in prometheus::core::Collector::collect(&self.requests) {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_owned())
                };
                let (Some(route), Some(status)) = (label("route"), label("status")) else { continue };
                let n = m.get_counter().get_value() as u64;
                let entry = out.entry(route).or_default();
                entry.0 += n;
                if status.starts_with('5') {
                    entry.1 += n;
                }
            }
        }
        out
    }

    /// The name of every metric family, including ones with no samples yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `tokengate_log_lines_dropped_total{reason}`, read from the process-wide counts of
/// [`crate::log`] at scrape time (the log starts before any registry exists).
struct LogDropped {
    desc: prometheus::core::Desc,
}

impl LogDropped {
    fn new() -> Self {
        let desc = prometheus::core::Desc::new(
            "tokengate_log_lines_dropped_total".into(),
            "Operator log lines not written, by reason (writer_behind: stderr was slow or stalled; \
             rate_limited: a library repeated a line more than once a second)."
                .into(),
            vec!["reason".into()],
            Default::default(),
        )
        .expect("valid metric");
        LogDropped { desc }
    }
}

impl prometheus::core::Collector for LogDropped {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let crate::log::Dropped { writer_behind, rate_limited } = crate::log::dropped();
        let counter =
            IntCounterVec::new(Opts::new(self.desc.fq_name.clone(), self.desc.help.clone()), &["reason"])
                .expect("valid metric");
        counter.with_label_values(&["writer_behind"]).inc_by(writer_behind);
        counter.with_label_values(&["rate_limited"]).inc_by(rate_limited);
        prometheus::core::Collector::collect(&counter)
    }
}

const METHODS: [&str; 10] =
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "OTHER"];
const STATUSES: [u16; 18] =
    [200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 429, 500, 502, 503, 504];

/// One route's request metrics, resolved once so the hot path does no label hashing or
/// registry locking: the histogram, and counters for common method and status pairs (others
/// fall back to the labelled lookup).
pub struct RouteMetrics {
    route: String,
    requests: IntCounterVec,
    duration: prometheus::Histogram,
    common: Box<[std::sync::OnceLock<prometheus::IntCounter>]>,
}

impl RouteMetrics {
    /// Handles for `route`.
    pub fn new(metrics: &Metrics, route: &str) -> Self {
        RouteMetrics {
            route: route.to_owned(),
            requests: metrics.requests.clone(),
            duration: metrics.request_duration.with_label_values(&[route]),
            common: (0..METHODS.len() * STATUSES.len()).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// The route label.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Counts one answered request. `method` is one of the bounded method labels.
    pub fn observe(&self, method: &'static str, status: http::StatusCode, seconds: f64) {
        self.duration.observe(seconds);
        let m = METHODS.iter().position(|x| *x == method);
        let s = STATUSES.iter().position(|x| *x == status.as_u16());
        match (m, s) {
            (Some(m), Some(s)) => self.common[m * STATUSES.len() + s]
                .get_or_init(|| self.requests.with_label_values(&[&self.route, method, status.as_str()]))
                .inc(),
            _ => self.requests.with_label_values(&[&self.route, method, status.as_str()]).inc(),
        }
    }
}
