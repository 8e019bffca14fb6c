//! The `tokengate` command.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use tokengate::config::{self, Config, Provider, TokenEndpoint};
use tokengate::{demo, server};

// glibc's malloc took a tenth of the CPU per proxied request (buffers past its per-thread cache
// go through its arena locks and consolidation); mimalloc keeps them in per-thread pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `tokengate --version`: the release, the commit and the day it was built.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("TOKENGATE_GIT_REV"),
    ", built ",
    env!("TOKENGATE_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "tokengate",
    version = VERSION,
    about = "Authenticating reverse proxy: injects OAuth2 / vendor access tokens into requests"
)]
struct Cli {
    /// Configuration file (for `run`, `check` and `token`).
    #[arg(short, long, global = true, env = "TOKENGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (`info`, `debug`, `tokengate=trace`...); beats RUST_LOG, which is used when
    /// this is not given [default: info].
    #[arg(long, global = true, env = "TOKENGATE_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default when only -c is given).
    Run {
        /// Configuration file (instead of -c).
        file: Option<PathBuf>,
        /// Worker threads serving requests, each with its own event loop (default: number of cores).
        #[arg(long)]
        workers: Option<usize>,
        /// Proxy listen address, over the file's `listen` (in a container: 0.0.0.0:8080).
        #[arg(long, env = "TOKENGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Admin listen address, over the file's `admin.listen` (in a container: 0.0.0.0:9090).
        #[arg(long, env = "TOKENGATE_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
    },
    /// Load and validate the configuration, print routes and providers, exit.
    Check {
        /// Also fetch one token from each provider (or only the named ones) and report the
        /// method, lifetime, granted scope and the clock offset to the IdP.
        #[arg(long)]
        live: bool,
        /// The configuration file (instead of -c), then, with --live, the providers to fetch
        /// (default: all).
        args: Vec<String>,
    },
    /// Fetch a token with a provider's configured flow and show its type, expiry, scope and
    /// JWT claims (the token itself only with --show).
    Token {
        /// `[FILE] PROVIDER`: the configuration file (instead of -c) and the provider's name.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Print the token itself.
        #[arg(long)]
        show: bool,
    },
    /// Print the configuration's JSON Schema (what config/tokengate.schema.json holds).
    Schema,
    /// Print a shell completion script: `tokengate completions bash > /etc/bash_completion.d/tokengate`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `tokengate man > tokengate.1; man ./tokengate.1`; with a
    /// subcommand, its own page (`tokengate man run > tokengate-run.1`).
    Man {
        /// The subcommand.
        subcommand: Option<String>,
    },
    /// Run a self-contained demo: a built-in token endpoint and echo upstream, proxy on :8080.
    Demo {
        /// Proxy listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listen address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One process-wide TLS provider, so no library falls back to a different one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Flushes the queued log lines when main returns.
    let _log = init_logging(&cli);
    let workers = match &cli.command {
        Some(Command::Run { workers, .. }) => *workers,
        _ => None,
    };
    if let Some(Command::Run { listen, admin_listen, .. }) = &cli.command {
        config::override_listeners(config::ListenerOverrides { listen: *listen, admin: *admin_listen });
    }
    match cli.command {
        Some(Command::Check { live, args }) => {
            let (file, providers) = file_then(&cli.config, args);
            if !live && !providers.is_empty() {
                eprintln!("error: provider names ({}) go with --live", providers.join(", "));
                return ExitCode::from(2);
            }
            with_config(&file, |path, c| {
                block_on(Some(1), async {
                    let code = check(path.to_owned(), &c).await;
                    if code != ExitCode::SUCCESS || !live { code } else { check_live(&c, &providers).await }
                })
            })
        }
        Some(Command::Token { args, show }) => {
            let (file, mut rest) = file_then(&cli.config, args);
            let Some(provider) = rest.pop().filter(|_| rest.is_empty()) else {
                eprintln!("error: usage: tokengate token [FILE] PROVIDER");
                return ExitCode::from(2);
            };
            with_config(&file, |_, c| block_on(None, token_main(c, provider, show)))
        }
        Some(Command::Demo { listen, admin }) => block_on(workers, demo_main(listen, admin)),
        Some(Command::Schema) => print(config::json_schema::generate().as_bytes()),
        Some(Command::Completions { shell }) => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tokengate", &mut out);
            print(&out)
        }
        Some(Command::Man { subcommand }) => manual(subcommand.as_deref()),
        Some(Command::Run { file, .. }) if file.is_some() && cli.config.is_some() => {
            eprintln!("error: give the configuration file once, as -c FILE or as an argument");
            ExitCode::from(2)
        }
        Some(Command::Run { ref file, .. }) if file.is_some() => {
            with_config(file, |path, config| serve(&cli, workers, path, config))
        }
        Some(Command::Run { .. }) | None => {
            with_config(&cli.config, |path, config| serve(&cli, workers, path, config))
        }
    }
}

/// The configuration file from -c, or else the first argument when it names a file; and the
/// arguments left.
fn file_then(config: &Option<PathBuf>, mut args: Vec<String>) -> (Option<PathBuf>, Vec<String>) {
    if config.is_some() {
        return (config.clone(), args);
    }
    let looks_like_file = args.first().is_some_and(|a| {
        let p = Path::new(a);
        p.is_file() || [".yaml", ".yml", ".json"].iter().any(|e| a.ends_with(e))
    });
    if looks_like_file {
        let file = args.remove(0);
        return (Some(PathBuf::from(file)), args);
    }
    (None, args)
}

/// `run`: serves `config` from `path` on the worker threads.
fn serve(cli: &Cli, workers: Option<usize>, path: &Path, mut config: Config) -> ExitCode {
    // The access log takes the shape of the other logs unless the file says otherwise.
    config.access_log.format.get_or_insert(match cli.log_format {
        LogFormat::Text => config::AccessLogFormat::Text,
        LogFormat::Json => config::AccessLogFormat::Json,
    });
    let threads = workers
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .and_then(std::num::NonZeroUsize::new)
        .unwrap_or(std::num::NonZeroUsize::MIN);
    // Requests are served on the worker threads; this runtime only has the admin listener, token
    // refreshes and signals.
    block_on(Some(1), run(path.to_owned(), config, server::Workers::Threads(threads)))
}

fn init_logging(cli: &Cli) -> tokengate::log::Guard {
    // An explicit --log wins over RUST_LOG, which wins over the default.
    // `token` prints the IdP's error itself; its own log would say it a second time.
    let default = if matches!(cli.command, Some(Command::Token { .. })) { "off" } else { "info" };
    let filter = match &cli.log {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
    };
    // Colour only for a terminal, and never with NO_COLOR (no-color.org): escape codes in a log
    // file are noise.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = !no_color && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = match cli.log_format {
        LogFormat::Text => tokengate::log::Format::Text,
        LogFormat::Json => tokengate::log::Format::Json,
    };
    tokengate::log::init(filter, format, ansi)
}

fn with_config(path: &Option<PathBuf>, f: impl FnOnce(&Path, Config) -> ExitCode) -> ExitCode {
    let Some(path) = path else {
        eprintln!(
            "error: no configuration file; pass it as an argument or -c FILE (or try `tokengate demo`)"
        );
        return ExitCode::from(2);
    };
    match config::load(path) {
        Ok(c) => f(path, c),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn block_on(workers: Option<usize>, fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        rt.worker_threads(n.max(1));
    }
    match rt.enable_all().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn check(path: PathBuf, config: &Config) -> ExitCode {
    // What `run` refuses (an unreadable certificate or CA file, a bad key) fails here too.
    if let Err(e) = server::prepare(config) {
        eprintln!("error: {}: {e}", path.display());
        return ExitCode::from(1);
    }
    let warnings: Vec<String> =
        config::permission_warning(&path).into_iter().chain(server::warnings(config)).collect();
    for w in &warnings {
        println!("warning: {w}");
    }
    let verdict = if warnings.is_empty() { "OK" } else { "OK, with warnings" };
    println!("{}: {verdict}", path.display());
    println!("listen {}  admin {}", config.listen, config.admin.listen);
    println!("\nroutes (longest prefix wins):");
    let mut routes: Vec<_> = config.routes.iter().collect();
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.as_str().len()));
    for r in routes {
        println!(
            "  {:<28} -> {:<44} provider={}{}",
            r.prefix.as_str(),
            r.upstream.to_string(),
            r.provider.0,
            if r.strip_prefix { "" } else { " (prefix kept)" }
        );
    }
    println!("\nproviders:");
    for (name, p) in &config.providers {
        println!("  {name}: {}", describe(p));
    }
    ExitCode::SUCCESS
}

/// `check --live`: one token fetch per provider, straight to the IdP (no shared cache), each
/// reported with what a rollout needs to know. Exits 1 when any fetch failed.
async fn check_live(config: &Config, only: &[String]) -> ExitCode {
    if let Some(unknown) = only.iter().find(|n| !config.providers.contains_key(*n)) {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        eprintln!("error: no provider named {unknown:?}; defined: {}", known.join(", "));
        return ExitCode::from(2);
    }
    println!(
        "
live check (one token fetch per provider):"
    );
    let mut failed = 0;
    for (name, p) in &config.providers {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        let method = match p {
            Provider::OAuth2(o) => {
                format!("oauth2 grant {}, client_auth {}", o.grant.name(), o.client_auth.name())
            }
            Provider::Http(_) => "http login".to_owned(),
            Provider::Static(_) => "static value".to_owned(),
        };
        let source =
            match tokengate::token::TokenSource::new(name, p, tokengate::metrics::Metrics::new(), None) {
                Ok(s) => s,
                Err(e) => {
                    println!("  {name}: FAILED ({method}): {e}");
                    failed += 1;
                    continue;
                }
            };
        source.accept_any_token_type(config.any_token_type(name));
        let started = std::time::Instant::now();
        match source.fetch_once().await {
            Ok(issued) => {
                let received = std::time::SystemTime::now();
                let offset = issued.server_date.map(|d| match d.duration_since(received) {
                    Ok(ahead) => ahead.as_secs_f64(),
                    Err(behind) => -behind.duration().as_secs_f64(),
                });
                let clock = match offset {
                    // `Date` has whole seconds: a second either way is rounding, not skew.
                    Some(o) => format!("{:+.0} s (IdP Date minus this machine's clock, ±1 s)", o),
                    None => "unknown (the IdP sent no Date header)".to_owned(),
                };
                println!("  {name}: OK ({method}) in {} ms", started.elapsed().as_millis());
                println!(
                    "      lifetime {} s ({})",
                    issued.lifetime.as_secs(),
                    lifetime_source(issued.lifetime_source)
                );
                print_scope("      scope    ", p, issued.scope.as_deref(), issued.access_token.expose());
                println!("      clock    {clock}");
                if offset.is_some_and(|o| o.abs() > 30.0) {
                    println!(
                        "      warning: the clocks differ by more than 30 s; fix NTP here or at the IdP, or assertions and expiry times will be misjudged"
                    );
                }
            }
            Err(e) => {
                println!("  {name}: FAILED ({method}): {e}");
                failed += 1;
            }
        }
    }
    let broken = if only.is_empty() { upstream_tls(config).await } else { 0 };
    if failed > 0 || broken > 0 {
        println!(
            "
{failed} provider(s) and {broken} upstream(s) failed"
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// `check --live`: a TLS handshake with every `https://` upstream, certificate verified as the
/// routes will (CA file, server name, client certificate, egress proxy). No request is sent, so
/// no credential leaves. Returns how many failed.
async fn upstream_tls(config: &Config) -> usize {
    use tokengate::upstream::{egress, stream};
    let https: Vec<_> =
        config.routes.iter().filter(|r| r.upstream.scheme == http::uri::Scheme::HTTPS).collect();
    if https.is_empty() {
        return 0;
    }
    println!("\nupstream TLS (handshake only, no request sent):");
    let mut failed = 0;
    for r in https {
        let host = r.server_name.as_ref().map_or(r.upstream.authority.host(), |n| n.0.as_str());
        let identity = match r.client_identity().as_ref().map(tokengate::tls::Identity::load).transpose() {
            Ok(i) => i,
            Err(e) => {
                println!("  {}: FAILED: {e}", r.upstream);
                failed += 1;
                continue;
            }
        };
        let tls = match stream::Tls::new(host, r.ca_file.as_deref(), identity, &[b"h2", b"http/1.1"]) {
            Ok(t) => t,
            Err(e) => {
                println!("  {}: FAILED: {e}", r.upstream);
                failed += 1;
                continue;
            }
        };
        let addr =
            format!("{}:{}", r.upstream.authority.host(), r.upstream.authority.port_u16().unwrap_or(443));
        let proxy = r.egress.as_ref().and_then(|e| e.proxy_for(true, r.upstream.authority.host()));
        let path = proxy.map_or(egress::Path::Direct, egress::Path::Tunnel);
        match stream::Stream::connect(&addr, path, Some(&tls), std::time::Duration::from_secs(5)).await {
            Ok(Some(conn)) => {
                let alpn =
                    conn.alpn().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or("none".into());
                println!("  {}: OK (certificate verified for {host}, ALPN {alpn})", r.upstream);
            }
            Ok(None) => {
                println!("  {}: FAILED: no TLS handshake within 5 s", r.upstream);
                failed += 1;
            }
            Err(e) => {
                let why = stream::certificate_problem(&e).unwrap_or_else(|| e.to_string());
                println!("  {}: FAILED: {why}", r.upstream);
                failed += 1;
            }
        }
    }
    failed
}

fn lifetime_source(s: tokengate::token::response::LifetimeSource) -> &'static str {
    match s {
        tokengate::token::response::LifetimeSource::ExpiresIn => "from expires_in",
        tokengate::token::response::LifetimeSource::ExpiresAt => "from expires_at",
        tokengate::token::response::LifetimeSource::JwtExp => "from the JWT exp claim",
        tokengate::token::response::LifetimeSource::Default => "no expiry stated: default_ttl",
    }
}

/// One line about a provider, without secrets.
fn describe(p: &Provider) -> String {
    match p {
        Provider::OAuth2(o) => {
            let endpoint = match &o.endpoint {
                TokenEndpoint::Url(u) => format!("token_url {u}"),
                TokenEndpoint::Discovery { issuer } => format!("issuer {issuer} (discovery)"),
            };
            format!(
                "oauth2 {}, {endpoint}, client_id {}, client_auth {}, scopes [{}]",
                o.grant.name(),
                o.client_id,
                o.client_auth.name(),
                o.scopes.join(" ")
            )
        }
        Provider::Http(h) => {
            let refresh = h
                .refresh
                .as_ref()
                .map_or_else(|| "no refresh".to_owned(), |r| format!("refresh {} {}", r.method, r.url));
            format!("http login {} {}, {refresh}", h.login.method, h.login.url)
        }
        Provider::Static(s) => {
            use tokengate::config::static_provider::{Source, StaticValue};
            let from = |s: &Source| match s {
                Source::Inline(_) => "from the configuration".to_owned(),
                Source::File(f) => format!("from {}", f.display()),
            };
            match &s.value {
                StaticValue::Value(v) => format!("static value {}", from(v)),
                StaticValue::Basic { username, password } => {
                    format!("static Basic, username {username}, password {}", from(password))
                }
            }
        }
    }
}

/// `tokengate token`: fetch one token with the configured flow and describe it.
async fn token_main(config: Config, provider: String, show: bool) -> ExitCode {
    let Some(p) = config.providers.get(&provider) else {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        eprintln!("error: no provider named {provider:?}; defined: {}", known.join(", "));
        return ExitCode::from(2);
    };
    // Straight to the IdP, bypassing any shared cache: this tests the credentials.
    let source =
        match tokengate::token::TokenSource::new(&provider, p, tokengate::metrics::Metrics::new(), None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
    source.accept_any_token_type(config.any_token_type(&provider));
    println!("provider   {provider}: {}", describe(p));
    match source.refresh().await {
        Ok(t) => {
            let value = t.value.expose();
            let shown = if show {
                value.to_owned()
            } else {
                format!("*** ({} characters; --show prints it)", value.len())
            };
            println!("token      {shown}");
            println!("type       Bearer");
            println!("expires    in {} s ({})", t.lifetime.as_secs(), lifetime_source(t.lifetime_source));
            print_scope("scope      ", p, t.scope.as_deref(), value);
            match tokengate::token::jwt::claims(value) {
                Some(claims) => {
                    let pretty = serde_json::to_string_pretty(&claims).unwrap_or_default();
                    println!("JWT claims (decoded, not verified):\n{pretty}");
                }
                None => println!("JWT claims (opaque token, not a JWT)"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.reason);
            ExitCode::from(1)
        }
    }
}

/// The granted scope, and loudly, requested scopes the IdP did not grant (or could not confirm).
fn print_scope(label: &str, provider: &Provider, stated: Option<&str>, token: &str) {
    use tokengate::token::scope::Granted;
    let requested = match provider {
        Provider::OAuth2(o) => o.scopes.clone(),
        _ => Vec::new(),
    };
    match tokengate::token::scope::granted(&requested, stated, token) {
        Granted::NoneRequested => println!("{label}{} (none requested)", stated.unwrap_or("(not stated)")),
        Granted::All(g) => println!("{label}{g} (every requested scope granted)"),
        Granted::Missing { granted, missing } => {
            println!("{label}{granted}");
            println!(
                "WARNING: requested scope(s) {} NOT granted: the IdP dropped them silently; check the scopes this client may request",
                missing.join(" ")
            );
        }
        Granted::Unconfirmed => println!(
            "{label}cannot be confirmed: the IdP states no scope and the token carries none (requested: {})",
            requested.join(" ")
        ),
    }
}

async fn run(path: PathBuf, config: Config, workers: server::Workers) -> ExitCode {
    if let Some(warning) = config::permission_warning(&path) {
        tracing::warn!("{warning}");
    }
    raise_descriptor_limit(&config);
    let running = match server::start_with(config, Some(path), workers).await {
        Ok(r) => r,
        Err(e) => {
            // Not eprintln!: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            return ExitCode::from(1);
        }
    };
    let summary = tokio::spawn(tokengate::log::summarize_held_lines());
    wait_for_signals(&running, true).await;
    summary.abort();
    let force = tokio::spawn(exit_on_second_signal(running.proxy.clone()));
    running.shutdown().await;
    force.abort();
    ExitCode::SUCCESS
}

/// A second SIGTERM or SIGINT during the shutdown sequence ends the process at once, as
/// operators expect of a second Ctrl-C.
async fn exit_on_second_signal(proxy: std::sync::Arc<tokengate::proxy::Proxy>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::warn!("second signal: exiting now without waiting for in-flight requests");
    proxy.access_log().flush();
    tokengate::log::finish();
    std::process::exit(1);
}

/// Raises the soft limit on open files to the hard limit (the common default soft limit, 1,024,
/// is far below what 10,000 client connections and their upstream connections need) and says how
/// many descriptors there are.
fn raise_descriptor_limit(config: &Config) {
    let limits = &config.limits;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(available) => {
            // Each client connection and each upstream connection is one descriptor.
            let wanted = limits.max_connections as u64 + limits.upstream_max_connections as u64 * 2 + 64;
            if available < wanted {
                tracing::warn!(
                    available,
                    wanted,
                    "few file descriptors: raise the hard limit (ulimit -Hn) or lower limits.max_connections"
                );
            } else {
                tracing::info!(available, "file descriptors available");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the configuration file on the way.
async fn wait_for_signals(running: &server::Running, reloadable: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup), Ok(mut usr1)) =
        (signal(SignalKind::terminate()), signal(SignalKind::hangup()), signal(SignalKind::user_defined1()))
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: reopening the access log");
                running.reopen_access_log();
            }
            _ = hup.recv() => {
                if !reloadable {
                    continue;
                }
                tracing::info!("SIGHUP: reloading the configuration");
                if let Err(e) = running.reload_file().await {
                    tracing::error!(error = %e, "reload failed; the previous configuration stays in force");
                }
            }
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
}

async fn demo_main(listen: SocketAddr, admin: SocketAddr) -> ExitCode {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (idp, echo) = match (demo::token_endpoint(any).await, demo::echo_upstream(any).await) {
        (Ok(i), Ok(e)) => (i, e),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot start the demo servers: {e}");
            return ExitCode::from(1);
        }
    };
    let text = demo::config_text(idp, echo, listen, admin);
    let config = match config::parse(&text, "<demo>") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let running = match server::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: {e}\n(is something already using the port? try --listen 127.0.0.1:18080 --admin 127.0.0.1:19090)"
            );
            return ExitCode::from(1);
        }
    };
    let (p, a) = (running.proxy_addr, running.admin_addr);
    // The configuration on disk too, so `tokengate token` and `check` can be tried on it.
    let file = std::env::temp_dir().join(format!("tokengate-demo-{}.yaml", std::process::id()));
    let written = std::fs::write(&file, &text).is_ok();
    let token_cmd = if written {
        format!(
            "\n  tokengate token -c {} demo        # fetch one token with the demo's credentials and describe it",
            file.display()
        )
    } else {
        String::new()
    };
    println!(
        "\ntokengate demo is running.\n\
         \n  token endpoint  http://{idp}/token   (client_credentials, {}s tokens)\
         \n                  client id {}, client secret {} (Basic auth)\
         \n  echo upstream   http://{echo}\
         \n  proxy           http://{p}   route /echo/ -> echo upstream\
         \n  admin           http://{a}\n\
         \nTry:\n\
         \n  curl -s http://{p}/echo/hello?x=1 -H 'Authorization: Basic bm90OnVzZWQ='   # the upstream sees a Bearer token instead\
         \n  curl -s --http2-prior-knowledge http://{p}/echo/over-h2\
         \n  curl -s http://{p}/nowhere                    # 404 no_route\
         \n  curl -s http://{a}/readyz\
         \n  curl -s http://{a}/tokens\
         \n  curl -s http://{a}/metrics | grep tokengate_token{token_cmd}\n\
         \nThe demo token lives {}s: watch it refresh in the log. Ctrl-C stops.\n",
        demo::TOKEN_LIFETIME_SECS,
        demo::CLIENT_ID,
        demo::CLIENT_SECRET,
        demo::TOKEN_LIFETIME_SECS,
    );
    wait_for_signals(&running, false).await;
    running.shutdown().await;
    if written {
        let _ = std::fs::remove_file(&file);
    }
    ExitCode::SUCCESS
}

/// The manual page of tokengate or of one subcommand (`tokengate-run(1)`), from the CLI definition.
fn manual(subcommand: Option<&str>) -> ExitCode {
    let mut command = Cli::command();
    command.build();
    let page = match subcommand {
        None => command,
        Some(name) => match command.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                eprintln!("error: no subcommand {name:?}; see tokengate --help");
                return ExitCode::from(2);
            }
        },
    };
    let mut out = Vec::new();
    match clap_mangen::Man::new(page).render(&mut out) {
        Ok(()) => print(&out),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}
