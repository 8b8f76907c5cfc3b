//! Configuration: every setting is an environment variable and the same-named CLI flag,
//! declared once, as a typed field of [`Config`] with its default, its parser and its
//! `--help` line.
//!
//! A bad value stops start-up with one line naming the *variable* and what it accepts
//! ([`ConfigError`]), never clap's multi-line usage text that names the flag; secrets
//! keep their values out of `--help`, error lines and `Debug`.

use std::{fmt, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    auth::{redact_url, Audience, Authenticator, KeySource},
    ratelimit::Policy,
};

/// The largest `MAX_N` accepted: F(10^6) has 208,988 digits and is computed in well
/// under a second; beyond that a single request could hold a core for many seconds.
pub const MAX_N_CEILING: u64 = 1_000_000;

/// An optional setting. An alias, not `Option`, so that clap hands the whole value to
/// its parser: an empty variable (as compose files write an unset one) means "not set",
/// but for the settings of [`ON_WHEN_SET`], which refuse a blank value.
pub type Maybe<T> = Option<T>;
/// A comma-separated setting; an alias for the same reason (empty: none).
pub type List<T> = Vec<T>;

/// Command line of the `fibonacci-api` binary.
#[derive(Debug, Parser)]
#[command(
    name = "fibonacci-api",
    version,
    about = "Returns the nth Fibonacci number over HTTP",
    long_about = "Returns the nth Fibonacci number over HTTP. Every setting is also an \
                  environment variable (shown in brackets); a bad one stops start-up with \
                  one line naming it."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

/// Subcommands besides serving (the default).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe a running instance (exit 0 when it answers 200); for container health checks,
    /// which have no shell or curl in a distroless image.
    Healthcheck {
        /// URL to probe; by default `/livez` where this configuration listens
        /// (`ADMIN_LISTEN_ADDR` if set, else `LISTEN_ADDR`; wildcards over loopback).
        #[arg(long)]
        url: Option<String>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The configuration of one service instance: each field is one setting.
#[derive(Clone, Args)]
pub struct Config {
    /// Where the API listens (and, unless ADMIN_LISTEN_ADDR is set, probes and metrics);
    /// `[::]:5000` serves IPv4 and IPv6.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:5000", value_parser = socket_addr)]
    pub listen_addr: SocketAddr,

    /// If set, /metrics, /livez and /readyz are served here only (the public port keeps
    /// the API, /health and /openapi.json).
    #[arg(long, env = "ADMIN_LISTEN_ADDR", default_value = "", hide_default_value = true, value_parser = maybe(socket_addr))]
    pub admin_listen_addr: Maybe<SocketAddr>,

    /// Largest n served (at most 1,000,000).
    #[arg(long, env = "MAX_N", default_value = "1000", value_parser = int_in(0u64, MAX_N_CEILING))]
    pub max_n: u64,

    /// Per-client windows, e.g. 30/minute,50/hour,200/day (second, minute, hour, day, each
    /// at most once); `off` disables limiting.
    #[arg(long, env = "RATE_LIMITS", default_value = "30/minute,50/hour,200/day", value_parser = rate_limits)]
    pub rate_limits: Maybe<Policy>,

    /// Comma-separated IPs or CIDRs of the proxies whose X-Forwarded-For is believed.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "", hide_default_value = true, value_parser = trusted_proxies)]
    pub trusted_proxies: List<IpNet>,

    /// One Redis node: redis://[user:password@]host:port/db or rediss://… for TLS;
    /// enables the Redis cache tier and cluster-wide rate limits. A secret.
    #[arg(long, env = "REDIS_URL", default_value = "", hide_default_value = true, hide_env_values = true, value_parser = maybe(redis_url))]
    pub redis_url: Maybe<String>,

    /// Comma-separated seed nodes of a Redis Cluster (redis:// or rediss://, the same
    /// credentials on each), instead of REDIS_URL. A secret.
    #[arg(long, env = "REDIS_CLUSTER_NODES", default_value = "", hide_default_value = true, hide_env_values = true, value_parser = cluster_nodes)]
    pub redis_cluster_nodes: List<String>,

    /// Milliseconds one Redis call may take; past it the tier is skipped.
    #[arg(long = "redis-timeout-ms", env = "REDIS_TIMEOUT_MS", default_value = "50", value_parser = millis_in(1, 60_000))]
    pub redis_timeout: Duration,

    /// Bytes the in-process cache may hold (0 keeps nothing).
    #[arg(long, env = "CACHE_MAX_BYTES", default_value = "67108864", value_parser = int_in(0u64, 1 << 40))]
    pub cache_max_bytes: u64,

    /// Seconds after SIGTERM during which readiness fails and serving goes on, before
    /// the drain.
    #[arg(long = "shutdown-drain-seconds", env = "SHUTDOWN_DRAIN_SECONDS", default_value = "5", value_parser = seconds_in(0, 3600))]
    pub shutdown_drain: Duration,

    /// json or text (coloured only on a terminal); the level comes from RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = log_format)]
    pub log_format: LogFormat,

    /// Comma-separated origins allowed by CORS, e.g. https://app.example.com (none if empty).
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", default_value = "", hide_default_value = true, value_parser = origins)]
    pub cors_allowed_origins: List<http::HeaderValue>,

    /// Serve the interactive API documentation (Swagger UI, compiled in) at /docs on the
    /// public port: true or false.
    #[arg(long, env = "DOCS_ENABLED", default_value = "true", value_parser = boolean, action = clap::ArgAction::Set)]
    pub docs_enabled: bool,

    /// Milliseconds one /fibonacci request may take (then 503).
    #[arg(long = "request-timeout-ms", env = "REQUEST_TIMEOUT_MS", default_value = "10000", value_parser = millis_in(1, 3_600_000))]
    pub request_timeout: Duration,

    /// Milliseconds within which a connection must finish its request head, or is closed.
    #[arg(long = "header-read-timeout-ms", env = "HEADER_READ_TIMEOUT_MS", default_value = "5000", value_parser = millis_in(1, 3_600_000))]
    pub header_read_timeout: Duration,

    /// Connections open at once; past it new ones are closed at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value = "10000", value_parser = int_in(1usize, 1_000_000))]
    pub max_connections: usize,

    /// Connections one client address (an IPv6 /64) may hold open; 0: no cap.
    /// TRUSTED_PROXIES are exempt.
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value = "64", value_parser = int_in(0u32, 1_000_000))]
    pub max_connections_per_address: u32,

    /// New connections per second one client address may open, in bursts of as many;
    /// 0: off. TRUSTED_PROXIES are exempt.
    #[arg(long, env = "CONNECTION_RATE_PER_ADDRESS", default_value = "64", value_parser = int_in(0u32, 1_000_000))]
    pub connection_rate_per_address: u32,

    /// Milliseconds a response may wait on a client that does not read it.
    #[arg(long = "write-timeout-ms", env = "WRITE_TIMEOUT_MS", default_value = "10000", value_parser = millis_in(1, 3_600_000))]
    pub write_timeout: Duration,

    /// /fibonacci requests served at once; past it 503 at once (probes are exempt).
    #[arg(long, env = "MAX_IN_FLIGHT", default_value = "1024", value_parser = int_in(1usize, 1_000_000))]
    pub max_in_flight: usize,

    /// Clients the in-process limiter remembers (and addresses whose connection rate is
    /// tracked).
    #[arg(long, env = "RATE_LIMIT_MAX_KEYS", default_value = "100000", value_parser = int_in(64usize, 100_000_000))]
    pub rate_limit_max_keys: usize,

    /// Every IPv6 /48 shares this many times each window (and connection limit) across
    /// its /64s; 0 turns the shared budget off.
    #[arg(long, env = "RATE_LIMIT_IPV6_48_FACTOR", default_value = "8", value_parser = int_in(0u32, 100))]
    pub rate_limit_ipv6_48_factor: u32,

    #[command(flatten)]
    pub jwt: JwtSettings,

    /// The JWT verifier built from `jwt` by [`Config::validate`]; `None` leaves the API open.
    #[arg(skip)]
    pub auth: Option<Arc<Authenticator>>,
}

/// Optional JWT bearer authentication of /fibonacci: exactly one key source, and the
/// audience this service's tokens carry.
#[derive(Clone, Args)]
pub struct JwtSettings {
    /// Turns on JWT bearer auth with this HS256 secret (at least 32 bytes). A secret.
    #[arg(long = "auth-jwt-hs256-secret", env = "AUTH_JWT_HS256_SECRET", default_value = "", hide_default_value = true, hide_env_values = true, value_parser = maybe(text))]
    pub hs256_secret: Maybe<String>,

    /// …or with this PEM public key: RSA → RS256, P-256 → ES256.
    #[arg(long = "auth-jwt-public-key-file", env = "AUTH_JWT_PUBLIC_KEY_FILE", default_value = "", hide_default_value = true, value_parser = maybe(path))]
    pub public_key_file: Maybe<PathBuf>,

    /// …or with the keys of this JWKS file, chosen by the token's kid.
    #[arg(long = "auth-jwt-jwks-file", env = "AUTH_JWT_JWKS_FILE", default_value = "", hide_default_value = true, value_parser = maybe(path))]
    pub jwks_file: Maybe<PathBuf>,

    /// …or with the keys of an identity provider's JWKS endpoint (https://, or http://
    /// to loopback), kept current. A secret (it may carry credentials).
    #[arg(long = "auth-jwt-jwks-url", env = "AUTH_JWT_JWKS_URL", default_value = "", hide_default_value = true, hide_env_values = true, value_parser = maybe(text))]
    pub jwks_url: Maybe<String>,

    /// The aud tokens must carry; required when auth is on (`*` accepts any audience).
    #[arg(long = "auth-jwt-audience", env = "AUTH_JWT_AUDIENCE", default_value = "", hide_default_value = true, value_parser = maybe(text))]
    pub audience: Maybe<String>,

    /// The iss tokens must carry, when set.
    #[arg(long = "auth-jwt-issuer", env = "AUTH_JWT_ISSUER", default_value = "", hide_default_value = true, value_parser = maybe(text))]
    pub issuer: Maybe<String>,
}

// --- Parsers: each returns what the setting expects when the value is not it. ---

fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .trim()
        .parse()
        .map_err(|_| "an IP address and port, e.g. 0.0.0.0:5000 or [::]:5000".into())
}

/// An optional value: empty is unset, anything else must pass `parse`.
fn maybe<T>(
    parse: impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
) -> impl Fn(&str) -> Result<Maybe<T>, String> + Clone + Send + Sync + 'static {
    move |value: &str| {
        if value.trim().is_empty() {
            Ok(None)
        } else {
            parse(value).map(Some)
        }
    }
}

fn text(value: &str) -> Result<String, String> {
    Ok(value.trim().to_owned())
}

fn path(value: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(value.trim()))
}

/// An integer within `min..=max`.
fn int_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy + Send + Sync + 'static,
{
    move |value: &str| {
        value
            .trim()
            .parse::<T>()
            .ok()
            .filter(|v| *v >= min && *v <= max)
            .ok_or_else(|| format!("an integer from {min} to {max}"))
    }
}

/// Milliseconds within `min..=max`.
fn millis_in(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    let int = int_in(min, max);
    move |value: &str| int(value).map(Duration::from_millis)
}

/// Seconds within `min..=max`.
fn seconds_in(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    let int = int_in(min, max);
    move |value: &str| int(value).map(Duration::from_secs)
}

fn comma_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn rate_limits(value: &str) -> Result<Maybe<Policy>, String> {
    if value.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    Policy::parse(value)
        .map(Some)
        .map_err(|why| format!("`off` or a list like 30/minute,50/hour,200/day ({why})"))
}

/// `TRUSTED_PROXIES`: IPs (taken as single-address networks) and CIDRs.
pub fn trusted_proxies(value: &str) -> Result<List<IpNet>, String> {
    let nets = comma_list(value)
        .map(|item| {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!(
                        "comma-separated IPs or CIDRs (e.g. 10.0.0.0/8,192.168.1.7); {item:?} is neither"
                    )
                })?;
            // Clients are compared as IPv4 (a dual-stack socket's ::ffff:a.b.c.d is the
            // IPv4 client a.b.c.d): a mapped entry is the IPv4 network it names.
            let net = match net {
                IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
                    .addr()
                    .to_ipv4_mapped()
                    .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
                    .map_or(net, IpNet::V4),
                _ => net,
            };
            // Trusting everyone lets every client write its own rate-limit key, and so does
            // trusting half of everyone twice (0.0.0.0/1,128.0.0.0/1). No proxy network is
            // wider than 10.0.0.0/8, or fc00::/7 (IPv6's unique local addresses).
            let widest = if net.addr().is_ipv4() { 8 } else { 7 };
            if net.prefix_len() < widest {
                return Err(format!(
                    "the proxies' own addresses; {item:?} is wider than any proxy network (/{widest} at most), so clients in it could choose their rate-limit keys"
                ));
            }
            // 10.1.2.3/8 is most likely a typo for 10.1.2.3/32 or 10.0.0.0/8: say which.
            if net.trunc() != net {
                return Err(format!(
                    "networks without host bits; {item:?} has them: {} or {}?",
                    net.trunc(),
                    IpNet::from(net.addr())
                ));
            }
            Ok(net)
        })
        .collect::<Result<List<IpNet>, String>>()?;
    // Each entry within those bounds, many together can still trust everyone (every
    // N.0.0.0/8): the union may cover at most four /8s of IPv4 — all its private and
    // shared ranges together are 1.3 — and two /7s of IPv6.
    let (mut v4, mut v6) = (0_u64, 0_u128);
    for net in IpNet::aggregate(&nets) {
        match net {
            IpNet::V4(n) => v4 += 1 << (32 - n.prefix_len()),
            IpNet::V6(n) => v6 += 1 << (128 - n.prefix_len()),
        }
    }
    if v4 > 4 << 24 || v6 > 2 << 121 {
        return Err(
            "the proxies' own addresses; these networks together trust more than four /8s of \
             IPv4 or two /7s of IPv6, so clients in them could choose their rate-limit keys"
                .into(),
        );
    }
    Ok(nets)
}

fn redis_url(value: &str) -> Result<String, String> {
    let url = value.trim();
    // Fail on a typo now rather than on the first request an hour later.
    redis::Client::open(url)
        .map(|_| url.to_owned())
        .map_err(|_| "a redis:// or rediss:// URL, e.g. redis://:password@redis:6379/0".into())
}

fn cluster_nodes(value: &str) -> Result<List<String>, String> {
    let nodes: Vec<String> = comma_list(value).map(str::to_owned).collect();
    let expected = "comma-separated seed nodes of a Redis Cluster, all redis:// or all \
        rediss:// with the same credentials, \
        e.g. rediss://:password@node-1:6379,rediss://:password@node-2:6379";
    if nodes.is_empty() {
        return Ok(nodes);
    }
    let tcp = nodes
        .iter()
        .all(|url| url.starts_with("redis://") || url.starts_with("rediss://"));
    // The generic line would leave an operator guessing which part of a URL is wrong.
    let fragments: Vec<Option<&str>> = nodes
        .iter()
        .map(|url| url.split_once('#').map(|(_, fragment)| fragment))
        .collect();
    // Not echoed: after a `#` left unencoded in a password comes the rest of it.
    if fragments.iter().flatten().any(|f| *f != "insecure") {
        return Err(format!(
            "{expected} (a seed has a #fragment other than #insecure, the one that skips \
             certificate checks; a # in a password is written %23)"
        ));
    }
    if fragments.iter().any(|f| *f != fragments[0]) {
        return Err(format!(
            "{expected} (#insecure on some seeds only: on every seed or on none)"
        ));
    }
    if !tcp || redis::cluster::ClusterClient::new(nodes.iter().map(String::as_str)).is_err() {
        return Err(expected.into());
    }
    let seeds = nodes
        .iter()
        .map(|url| redis::IntoConnectionInfo::into_connection_info(url.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| expected.to_owned())?;
    // The client library takes the first seed's credentials for every node; a seed that
    // differs (one without the password, say) would have the service run on the wrong ones.
    fn credentials(seed: &redis::ConnectionInfo) -> (Option<&str>, Option<&str>) {
        let settings = seed.redis_settings();
        (settings.username(), settings.password())
    }
    if seeds
        .iter()
        .any(|seed| credentials(seed) != credentials(&seeds[0]))
    {
        return Err(format!(
            "{expected} (one seed's user or password differs from the others')"
        ));
    }
    // A cluster has database 0 only: a node URL naming another would never work.
    if seeds.iter().any(|seed| seed.redis_settings().db() != 0) {
        return Err(format!(
            "{expected} (no /db: a Redis Cluster has database 0 only)"
        ));
    }
    Ok(nodes)
}

fn boolean(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("true or false".into()),
    }
}

fn log_format(value: &str) -> Result<LogFormat, String> {
    match value.trim() {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        _ => Err("json or text".into()),
    }
}

fn origins(value: &str) -> Result<List<http::HeaderValue>, String> {
    comma_list(value)
        .map(|origin| {
            let origin = origin.trim_end_matches('/');
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.contains(|c: char| c.is_whitespace());
            valid
                .then(|| http::HeaderValue::from_str(origin).ok())
                .flatten()
                .ok_or_else(|| "comma-separated origins like https://app.example.com".into())
        })
        .collect()
}

// --- Errors ---

/// A setting that cannot be used; its `Display` is the one line printed at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: String,
}

/// What `Debug` and error lines show instead of a secret.
const REDACTED: &str = "<redacted>";

impl ConfigError {
    fn new(var: &'static str, value: &str, expected: impl Into<String>) -> Self {
        Self {
            var,
            value: value.to_owned(),
            expected: expected.into(),
        }
    }

    /// The one line for a value clap's parsers refused, naming the variable (and hiding
    /// a secret's value); `None` for other command-line mistakes, which clap explains.
    fn from_clap(error: &clap::Error) -> Option<Self> {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        if !matches!(
            error.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        ) {
            return None;
        }
        let ContextValue::String(flag) = error.get(ContextKind::InvalidArg)? else {
            return None;
        };
        let value = match error.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(value)) => value.clone(),
            _ => String::new(),
        };
        let long = flag.trim_start_matches("--").split([' ', '=']).next()?;
        let command = Cli::command();
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))?;
        let var = arg.get_env()?.to_str()?;
        // Leaked once per process: a handful of names, and only on the way to exit.
        let var: &'static str = Box::leak(var.to_owned().into_boxed_str());
        let expected = std::error::Error::source(error)
            .map(ToString::to_string)
            .unwrap_or_else(|| "a valid value".into());
        let shown = if arg.is_hide_env_values_set() {
            REDACTED.to_owned()
        } else {
            value
        };
        Some(Self::new(var, &shown, expected))
    }
}

/// Why the command line could not be used.
#[derive(Debug)]
pub enum StartError {
    /// A setting: one line naming it.
    Setting(ConfigError),
    /// Anything else (an unknown flag, `--help`, `--version`): clap's own text.
    Usage(clap::Error),
}

impl Cli {
    /// The command line and environment, parsed and validated.
    pub fn load() -> Result<Self, StartError> {
        Self::load_from(std::env::args_os())
    }

    /// As [`Cli::load`], from these arguments (and the environment).
    pub fn load_from<I, T>(args: I) -> Result<Self, StartError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let refused = |e: clap::Error| match ConfigError::from_clap(&e) {
            Some(setting) => StartError::Setting(setting),
            None => StartError::Usage(e),
        };
        let matches = Self::command()
            .try_get_matches_from(args)
            .map_err(refused)?;
        let mut cli = Self::from_arg_matches(&matches).map_err(refused)?;
        refuse_blank(&matches).map_err(StartError::Setting)?;
        cli.config.validate().map_err(StartError::Setting)?;
        Ok(cli)
    }
}

/// Settings that turn something on when set. Blank, any other optional setting means
/// "not set" (as a compose file's `${VAR}` writes an unset one); blank, one of these
/// would turn Redis, authentication or the admin port off without a word — an empty
/// Secret key, say — and a Redis never configured reports no `redis_up`, so no alert.
const ON_WHEN_SET: [&str; 8] = [
    "REDIS_URL",
    "REDIS_CLUSTER_NODES",
    "ADMIN_LISTEN_ADDR",
    "AUTH_JWT_HS256_SECRET",
    "AUTH_JWT_PUBLIC_KEY_FILE",
    "AUTH_JWT_JWKS_FILE",
    "AUTH_JWT_JWKS_URL",
    "AUTH_JWT_ISSUER",
];

/// Refuses one of [`ON_WHEN_SET`] given blank, in the environment or as a flag.
fn refuse_blank(matches: &clap::ArgMatches) -> Result<(), ConfigError> {
    use clap::parser::ValueSource;
    for arg in Cli::command().get_arguments() {
        let Some(var) = arg.get_env().and_then(|v| v.to_str()) else {
            continue;
        };
        let Some(var) = ON_WHEN_SET.iter().copied().find(|known| *known == var) else {
            continue;
        };
        let given = matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::EnvVariable | ValueSource::CommandLine)
        );
        let blank = matches
            .get_raw(arg.get_id().as_str())
            .is_some_and(|mut values| values.all(|v| v.to_string_lossy().trim().is_empty()));
        if given && blank {
            return Err(ConfigError::new(
                var,
                "",
                "a value, or the variable unset to leave this off (set but blank, as an empty \
                 Secret key leaves it, it would turn the feature off without a word)",
            ));
        }
    }
    Ok(())
}

impl Config {
    /// The configuration these arguments give, ignoring the environment (for tests and
    /// tools): validated, with the verifier built when auth is on.
    pub fn from_args(args: &[&str]) -> Result<Self, ConfigError> {
        let command = Cli::command().mut_args(|arg| arg.env(None::<&str>));
        let argv = std::iter::once("fibonacci-api").chain(args.iter().copied());
        let matches = command.try_get_matches_from(argv).map_err(|e| {
            ConfigError::from_clap(&e)
                .unwrap_or_else(|| ConfigError::new("argument", "", e.to_string()))
        })?;
        let mut config = Cli::from_arg_matches(&matches)
            .map_err(|e| ConfigError::new("argument", "", e.to_string()))?
            .config;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules that join several settings, and builds the JWT verifier.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.redis_url.is_some() && !self.redis_cluster_nodes.is_empty() {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                REDACTED,
                "not to be set together with REDIS_URL: one Redis node (REDIS_URL) or a \
                 Redis Cluster (REDIS_CLUSTER_NODES)",
            ));
        }
        self.auth = self.jwt.authenticator()?.map(Arc::new);
        Ok(())
    }
}

impl JwtSettings {
    /// The verifier, when a key source is configured; `Err` names the setting at fault.
    fn authenticator(&self) -> Result<Option<Authenticator>, ConfigError> {
        const SOURCES: &str =
            "AUTH_JWT_HS256_SECRET, AUTH_JWT_PUBLIC_KEY_FILE, AUTH_JWT_JWKS_FILE or AUTH_JWT_JWKS_URL";
        let shown_path = |p: &Maybe<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        // (variable, value as an error line may show it)
        let given: Vec<(&'static str, String)> = [
            (
                "AUTH_JWT_HS256_SECRET",
                self.hs256_secret.as_ref().map(|_| REDACTED.to_owned()),
            ),
            (
                "AUTH_JWT_PUBLIC_KEY_FILE",
                shown_path(&self.public_key_file),
            ),
            ("AUTH_JWT_JWKS_FILE", shown_path(&self.jwks_file)),
            (
                "AUTH_JWT_JWKS_URL",
                self.jwks_url.as_deref().map(redact_url),
            ),
        ]
        .into_iter()
        .filter_map(|(var, shown)| Some((var, shown?)))
        .collect();
        let (var, shown) = match given.as_slice() {
            [] => {
                return match (&self.audience, &self.issuer) {
                    (None, None) => Ok(None),
                    (Some(aud), _) => Err(ConfigError::new(
                        "AUTH_JWT_AUDIENCE",
                        aud,
                        format!("to be set together with {SOURCES}"),
                    )),
                    (None, Some(iss)) => Err(ConfigError::new(
                        "AUTH_JWT_ISSUER",
                        iss,
                        format!("to be set together with {SOURCES}"),
                    )),
                };
            }
            [one] => one.clone(),
            several => {
                let names: Vec<_> = several.iter().map(|(var, _)| *var).collect();
                return Err(ConfigError::new(
                    "AUTH_JWT_*",
                    &names.join(" and "),
                    format!("exactly one of {SOURCES}"),
                ));
            }
        };
        // A token minted for another service (same IdP, another `aud`) must not pass.
        let audience = match self.audience.as_deref() {
            None => {
                return Err(ConfigError::new(
                    "AUTH_JWT_AUDIENCE",
                    "",
                    format!(
                        "the audience (aud) of this service's tokens when {var} is set, \
                         e.g. fibonacci-api; or * to accept tokens meant for any service"
                    ),
                ))
            }
            Some("*") => Audience::Any,
            Some(aud) => Audience::Exactly(aud.to_owned()),
        };
        let source = KeySource {
            hs256_secret: self.hs256_secret.as_deref(),
            public_key_file: self.public_key_file.as_deref(),
            jwks_file: self.jwks_file.as_deref(),
            jwks_url: self.jwks_url.as_deref(),
        };
        Authenticator::new(source, audience, self.issuer.as_deref())
            .map(Some)
            .map_err(|expected| ConfigError::new(var, &shown, expected))
    }
}

impl Default for Config {
    /// The contract defaults, without reading the environment (tests build on this).
    fn default() -> Self {
        Self::from_args(&[]).expect("the contract defaults are valid")
    }
}

// --- Debug, with the secrets redacted ---

/// Writes `Debug` for a struct listing every field, destructured without `..`: a new
/// field does not compile until it is listed here, either shown or `secret`.
macro_rules! debug_struct {
    ($this:expr, $f:expr, $name:ident { $($field:ident),* $(,)? } secret { $($secret:ident => $redact:expr),* $(,)? }) => {{
        // "pattern requires `..` due to inaccessible fields" on this line means a field
        // of the struct is missing from its `debug_struct!` list below: add it there
        // (under `secret` if it is one). Adding `..` would let secrets print.
        let $name { $($field,)* $($secret,)* } = $this;
        let mut debug = $f.debug_struct(stringify!($name));
        $(debug.field(stringify!($field), $field);)*
        $(debug.field(stringify!($secret), &$redact($secret));)*
        debug.finish()
    }};
}

fn redact_secret(value: &Maybe<String>) -> Option<&'static str> {
    value.as_ref().map(|_| REDACTED)
}

fn redact_optional_url(value: &Maybe<String>) -> Option<String> {
    value.as_deref().map(redact_url)
}

fn redact_urls(value: &[String]) -> Vec<String> {
    value.iter().map(|url| redact_url(url)).collect()
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_struct!(self, f, Config {
            listen_addr, admin_listen_addr, max_n, rate_limits, trusted_proxies,
            redis_timeout, cache_max_bytes, shutdown_drain, log_format, cors_allowed_origins, docs_enabled,
            request_timeout, header_read_timeout, max_connections, max_connections_per_address,
            connection_rate_per_address, write_timeout, max_in_flight, rate_limit_max_keys,
            rate_limit_ipv6_48_factor, jwt,
            // Its own `Debug` shows the algorithms or the redacted JWKS URL, never a key.
            auth,
        } secret {
            redis_url => redact_optional_url,
            redis_cluster_nodes => redact_urls,
        })
    }
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_struct!(self, f, JwtSettings {
            public_key_file, jwks_file, audience, issuer,
        } secret {
            hs256_secret => redact_secret,
            jwks_url => redact_optional_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(args)
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = Config::default();
        assert_eq!(config.listen_addr, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(config.max_n, 1000);
        assert_eq!(config.redis_timeout, Duration::from_millis(50));
        assert_eq!(config.cache_max_bytes, 67_108_864);
        assert_eq!(config.shutdown_drain, Duration::from_secs(5));
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(config.redis_url.is_none() && config.admin_listen_addr.is_none());
        assert!(config.trusted_proxies.is_empty() && config.cors_allowed_origins.is_empty());
        let policy = config.rate_limits.expect("limits on by default");
        assert_eq!(policy.to_string(), "30/minute,50/hour,200/day");
    }

    #[test]
    fn trusted_proxies_wider_than_a_private_network_are_refused() {
        for wide in [
            "0.0.0.0/0",
            "0.0.0.0/1,128.0.0.0/1",
            "10.0.0.1,::/0",
            "::/1",
            "8000::/1",
            "fc00::/6",
        ] {
            let err = trusted_proxies(wide).unwrap_err();
            assert!(
                err.contains("wider than any proxy network"),
                "{wide}: {err}"
            );
        }
        for private in [
            "10.0.0.0/8",
            "fc00::/7",
            "172.16.0.0/12,192.168.1.7,fd00::/8",
            // Every private and shared range of IPv4 at once: a mesh of providers.
            "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7",
        ] {
            assert!(trusted_proxies(private).is_ok(), "{private}");
        }
    }

    #[test]
    fn trusted_proxies_that_together_cover_too_much_are_refused() {
        // Each /8 alone is fine; 256 of them trust every IPv4 address.
        let every_8: Vec<String> = (0..=255).map(|a| format!("{a}.0.0.0/8")).collect();
        for many in [
            every_8.join(","),
            every_8[..5].join(","),
            "fc00::/7,fe00::/7,2000::/7".into(),
        ] {
            let err = trusted_proxies(&many).unwrap_err();
            assert!(err.contains("together"), "{many}: {err}");
        }
        assert!(trusted_proxies(&every_8[..4].join(",")).is_ok());
    }

    #[test]
    fn ipv4_mapped_proxies_are_the_ipv4_networks_they_name() {
        // Clients are compared as IPv4: a mapped entry would trust no one.
        let nets = trusted_proxies("::ffff:10.1.0.0/112,::ffff:192.168.1.7").unwrap();
        assert_eq!(
            nets,
            [
                "10.1.0.0/16".parse::<IpNet>().unwrap(),
                "192.168.1.7/32".parse().unwrap()
            ]
        );
        let err = trusted_proxies("::ffff:0:0/96").unwrap_err();
        assert!(err.contains("wider than any proxy network"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--max-n", "abc"], "MAX_N", "not a number"),
            (&["--max-n=-1"], "MAX_N", "negative"),
            (&["--max-n", "1000001"], "MAX_N", "above the ceiling"),
            (&["--listen-addr", "localhost"], "LISTEN_ADDR", "no port"),
            (
                &["--rate-limits", "30/fortnight"],
                "RATE_LIMITS",
                "unknown unit",
            ),
            (&["--rate-limits", "0/minute"], "RATE_LIMITS", "zero limit"),
            (
                &["--trusted-proxies", "10.0.0.0/33"],
                "TRUSTED_PROXIES",
                "bad prefix",
            ),
            (&["--redis-url", "http://x"], "REDIS_URL", "wrong scheme"),
            (
                &["--redis-timeout-ms", "0"],
                "REDIS_TIMEOUT_MS",
                "zero timeout",
            ),
            (&["--log-format", "xml"], "LOG_FORMAT", "unknown format"),
            (
                &["--cors-allowed-origins", "example.com"],
                "CORS_ALLOWED_ORIGINS",
                "no scheme",
            ),
            (
                &["--shutdown-drain-seconds", "1.5"],
                "SHUTDOWN_DRAIN_SECONDS",
                "fraction",
            ),
        ];
        for (args, var, why) in cases {
            let err = settings(args).expect_err(why);
            assert_eq!(err.var, *var, "{why}: {err}");
            let line = err.to_string();
            assert!(!line.contains('\n') && line.contains(var), "{why}: {line}");
        }
    }

    #[test]
    fn the_jwt_secret_is_never_echoed() {
        let err = settings(&["--auth-jwt-hs256-secret", "hunter2-but-short"]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn redis_url_is_never_echoed() {
        let err = settings(&["--redis-url", "http://user:hunter2@x"]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn every_secret_hides_its_value_in_help() {
        use clap::CommandFactory;
        const SECRET_LOOKING: [&str; 5] = ["URL", "SECRET", "NODES", "PASSWORD", "TOKEN"];
        let command = Cli::command();
        let secrets: Vec<_> = command
            .get_arguments()
            .filter_map(|arg| Some((arg, arg.get_env()?.to_str()?.to_owned())))
            .filter(|(_, env)| SECRET_LOOKING.iter().any(|s| env.contains(s)))
            .collect();
        for (arg, env) in &secrets {
            assert!(
                arg.is_hide_env_values_set(),
                "{env} shows its value in --help"
            );
        }
        let names: Vec<_> = secrets.iter().map(|(_, env)| env.as_str()).collect();
        for known in ["REDIS_URL", "AUTH_JWT_HS256_SECRET", "AUTH_JWT_JWKS_URL"] {
            assert!(names.contains(&known), "{known} among {names:?}");
        }
    }

    #[test]
    fn auth_needs_an_audience_or_an_explicit_star() {
        let secret = "a-secret-of-at-least-thirty-two-bytes";
        let err = settings(&["--auth-jwt-hs256-secret", secret]).unwrap_err();
        assert_eq!(err.var, "AUTH_JWT_AUDIENCE", "{err}");
        assert!(err.to_string().contains('*') && !err.to_string().contains(secret));
        for audience in ["*", "fibonacci-api"] {
            let config = settings(&[
                "--auth-jwt-hs256-secret",
                secret,
                "--auth-jwt-audience",
                audience,
            ]);
            assert!(config.is_ok_and(|c| c.auth.is_some()), "{audience}");
        }
    }

    #[test]
    fn a_seed_list_with_a_stray_fragment_says_so() {
        let cases = [
            (
                "rediss://a:6379#insecure,rediss://b:6379",
                "#insecure on some seeds only",
            ),
            (
                "rediss://a:6379#INSECURE,rediss://b:6379#INSECURE",
                "other than #insecure",
            ),
            ("rediss://a:6379#insecure=1", "other than #insecure"),
            // A password with an unencoded #: its tail is not repeated in the message.
            (
                "rediss://:secret#tail@a:6379",
                "a # in a password is written %23",
            ),
        ];
        for (value, why) in cases {
            let err = cluster_nodes(value).unwrap_err();
            assert!(err.contains(why), "{value}: {err}");
            assert!(!err.contains("tail"), "{value}: {err}");
        }
        assert!(cluster_nodes("rediss://a:6379#insecure,rediss://b:6379#insecure").is_ok());
        assert!(cluster_nodes("rediss://a:6379,rediss://b:6379").is_ok());
    }

    #[test]
    fn urls_are_redacted_for_display() {
        let cases = [
            (
                "redis://:pw@redis:6379/0",
                "redis://<redacted>@redis:6379/0",
            ),
            (
                "rediss://user:p@ss@redis:6380/1#insecure",
                "rediss://<redacted>@redis:6380/1",
            ),
            ("redis://redis:6379", "redis://redis:6379"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=pw",
                "redis+unix:///run/redis.sock?<redacted>",
            ),
            (
                "https://idp.example/jwks?key=pw",
                "https://idp.example/jwks?<redacted>",
            ),
            (
                "https://a:pw/x@idp.example/jwks",
                "https://<redacted>@idp.example/jwks",
            ),
            ("pw-without-a-scheme", "<redacted>"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn lists_accept_spaces_and_single_addresses() {
        let config = settings(&[
            "--trusted-proxies",
            " 10.0.0.0/8, 192.168.1.7 ,::1",
            "--cors-allowed-origins",
            "https://a.example, http://localhost:3000/",
            "--rate-limits",
            "OFF",
        ])
        .unwrap();
        assert_eq!(config.trusted_proxies.len(), 3);
        assert_eq!(config.cors_allowed_origins[1], "http://localhost:3000");
        assert!(config.rate_limits.is_none());
    }
}
