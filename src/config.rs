//! Configuration: every setting is an environment variable and the same-named CLI flag.
//!
//! clap only collects the raw strings; [`Cli::into_config`] validates them so that a bad
//! value stops start-up with one line naming the *variable* and what it accepts, rather
//! than clap's multi-line usage text that names the flag.

use std::{fmt, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    auth::{redact_url, Audience, Authenticator, KeySource},
    ratelimit::Policy,
};

/// Contract defaults, shared by the CLI and [`Config::default`] so they cannot drift.
pub mod defaults {
    pub const LISTEN_ADDR: &str = "0.0.0.0:5000";
    pub const MAX_N: &str = "1000";
    pub const RATE_LIMITS: &str = "30/minute,50/hour,200/day";
    pub const REDIS_TIMEOUT_MS: &str = "50";
    pub const CACHE_MAX_BYTES: &str = "67108864";
    pub const SHUTDOWN_DRAIN_SECONDS: &str = "5";
    pub const LOG_FORMAT: &str = "json";
    pub const REQUEST_TIMEOUT_MS: &str = "10000";
    pub const HEADER_READ_TIMEOUT_MS: &str = "5000";
    pub const MAX_CONNECTIONS: &str = "10000";
    pub const MAX_CONNECTIONS_PER_ADDRESS: &str = "64";
    pub const CONNECTION_RATE_PER_ADDRESS: &str = "64";
    pub const WRITE_TIMEOUT_MS: &str = "10000";
    pub const MAX_IN_FLIGHT: &str = "1024";
    pub const RATE_LIMIT_MAX_KEYS: &str = "100000";
    pub const RATE_LIMIT_IPV6_48_FACTOR: &str = "8";
}

/// The largest `MAX_N` accepted: F(10^6) has 208,988 digits and is computed in well
/// under a second; beyond that a single request could hold a core for many seconds.
pub const MAX_N_CEILING: u64 = 1_000_000;

/// Command line of the `fibonacci-api` binary.
#[derive(Debug, Parser)]
#[command(
    name = "fibonacci-api",
    version,
    about = "Returns the nth Fibonacci number over HTTP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
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

/// Raw settings as given; see the README's configuration table for their meaning.
///
/// Secrets (`REDIS_URL`, `AUTH_JWT_HS256_SECRET`, `AUTH_JWT_JWKS_URL`) hide their values
/// from `--help` and from `Debug`.
#[derive(Args)]
pub struct Settings {
    #[arg(long, env = "LISTEN_ADDR", default_value = defaults::LISTEN_ADDR)]
    pub listen_addr: String,
    #[arg(long, env = "ADMIN_LISTEN_ADDR")]
    pub admin_listen_addr: Option<String>,
    #[arg(long, env = "MAX_N", default_value = defaults::MAX_N)]
    pub max_n: String,
    #[arg(long, env = "RATE_LIMITS", default_value = defaults::RATE_LIMITS)]
    pub rate_limits: String,
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    #[arg(long, env = "REDIS_CLUSTER_NODES", hide_env_values = true)]
    pub redis_cluster_nodes: Option<String>,
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value = defaults::REDIS_TIMEOUT_MS)]
    pub redis_timeout_ms: String,
    #[arg(long, env = "CACHE_MAX_BYTES", default_value = defaults::CACHE_MAX_BYTES)]
    pub cache_max_bytes: String,
    #[arg(long, env = "SHUTDOWN_DRAIN_SECONDS", default_value = defaults::SHUTDOWN_DRAIN_SECONDS)]
    pub shutdown_drain_seconds: String,
    #[arg(long, env = "LOG_FORMAT", default_value = defaults::LOG_FORMAT)]
    pub log_format: String,
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", default_value = "")]
    pub cors_allowed_origins: String,
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value = defaults::REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: String,
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value = defaults::HEADER_READ_TIMEOUT_MS)]
    pub header_read_timeout_ms: String,
    #[arg(long, env = "MAX_CONNECTIONS", default_value = defaults::MAX_CONNECTIONS)]
    pub max_connections: String,
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value = defaults::MAX_CONNECTIONS_PER_ADDRESS)]
    pub max_connections_per_address: String,
    #[arg(long, env = "CONNECTION_RATE_PER_ADDRESS", default_value = defaults::CONNECTION_RATE_PER_ADDRESS)]
    pub connection_rate_per_address: String,
    #[arg(long, env = "WRITE_TIMEOUT_MS", default_value = defaults::WRITE_TIMEOUT_MS)]
    pub write_timeout_ms: String,
    #[arg(long, env = "MAX_IN_FLIGHT", default_value = defaults::MAX_IN_FLIGHT)]
    pub max_in_flight: String,
    #[arg(long, env = "RATE_LIMIT_MAX_KEYS", default_value = defaults::RATE_LIMIT_MAX_KEYS)]
    pub rate_limit_max_keys: String,
    #[arg(long, env = "RATE_LIMIT_IPV6_48_FACTOR", default_value = defaults::RATE_LIMIT_IPV6_48_FACTOR)]
    pub rate_limit_ipv6_48_factor: String,
    #[arg(long, env = "AUTH_JWT_HS256_SECRET", hide_env_values = true)]
    pub auth_jwt_hs256_secret: Option<String>,
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub auth_jwt_public_key_file: Option<String>,
    #[arg(long, env = "AUTH_JWT_JWKS_FILE")]
    pub auth_jwt_jwks_file: Option<String>,
    #[arg(long, env = "AUTH_JWT_JWKS_URL", hide_env_values = true)]
    pub auth_jwt_jwks_url: Option<String>,
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Validated configuration of one service instance (`Debug` redacts the secrets).
#[derive(Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub admin_listen_addr: Option<SocketAddr>,
    pub max_n: u64,
    /// `None` when `RATE_LIMITS=off`.
    pub rate_limits: Option<Policy>,
    pub trusted_proxies: Vec<IpNet>,
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster, instead of `redis_url`.
    pub redis_cluster_nodes: Vec<String>,
    pub redis_timeout: Duration,
    pub cache_max_bytes: u64,
    pub shutdown_drain: Duration,
    pub log_format: LogFormat,
    pub cors_allowed_origins: Vec<http::HeaderValue>,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Connections one address may hold open (0: no cap); trusted proxies are exempt.
    pub max_connections_per_address: u32,
    /// New connections per second one address may open, in bursts of as many (0: off).
    pub connection_rate_per_address: u32,
    /// How long a response may wait on a client that does not read it.
    pub write_timeout: Duration,
    pub max_in_flight: usize,
    pub rate_limit_max_keys: usize,
    /// Each IPv6 /48 shares this many times every window (0: no shared budget).
    pub rate_limit_ipv6_48_factor: u32,
    /// JWT bearer authentication of `/fibonacci`; `None` leaves it open.
    pub auth: Option<Arc<Authenticator>>,
}

/// What `Debug` and error lines show instead of a secret.
const REDACTED: &str = "<redacted>";

/// Writes `Debug` for a struct listing every field, destructured without `..`: a new
/// field does not compile until it is listed here, either shown or `secret`.
macro_rules! debug_struct {
    ($this:expr, $f:expr, $name:ident { $($field:ident),* $(,)? } secret { $($secret:ident => $redact:expr),* $(,)? }) => {{
        let $name { $($field,)* $($secret,)* } = $this;
        let mut debug = $f.debug_struct(stringify!($name));
        $(debug.field(stringify!($field), $field);)*
        $(debug.field(stringify!($secret), &$redact($secret));)*
        debug.finish()
    }};
}

fn redact_secret(value: &Option<String>) -> Option<&'static str> {
    value.as_ref().map(|_| REDACTED)
}

fn redact_optional_url(value: &Option<String>) -> Option<String> {
    value.as_deref().map(redact_url)
}

fn redact_optional_url_list(value: &Option<String>) -> Option<Vec<String>> {
    value
        .as_deref()
        .map(|list| comma_list(list).map(redact_url).collect())
}

fn redact_urls(value: &[String]) -> Vec<String> {
    value.iter().map(|url| redact_url(url)).collect()
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_struct!(self, f, Settings {
            listen_addr, admin_listen_addr, max_n, rate_limits, trusted_proxies,
            redis_timeout_ms, cache_max_bytes, shutdown_drain_seconds, log_format,
            cors_allowed_origins, request_timeout_ms, header_read_timeout_ms,
            max_connections, max_connections_per_address, connection_rate_per_address,
            write_timeout_ms, max_in_flight, rate_limit_max_keys, rate_limit_ipv6_48_factor,
            auth_jwt_public_key_file, auth_jwt_jwks_file, auth_jwt_audience, auth_jwt_issuer,
        } secret {
            redis_url => redact_optional_url,
            redis_cluster_nodes => redact_optional_url_list,
            auth_jwt_hs256_secret => redact_secret,
            auth_jwt_jwks_url => redact_optional_url,
        })
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_struct!(self, f, Config {
            listen_addr, admin_listen_addr, max_n, rate_limits, trusted_proxies,
            redis_timeout, cache_max_bytes, shutdown_drain, log_format, cors_allowed_origins,
            request_timeout, header_read_timeout, max_connections, max_connections_per_address,
            connection_rate_per_address, write_timeout, max_in_flight, rate_limit_max_keys,
            rate_limit_ipv6_48_factor,
            // Its own `Debug` shows the algorithms or the redacted JWKS URL, never a key.
            auth,
        } secret {
            redis_url => redact_optional_url,
            redis_cluster_nodes => redact_urls,
        })
    }
}

/// A setting that cannot be used; its `Display` is the one line printed at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: String,
}

impl ConfigError {
    fn new(var: &'static str, value: &str, expected: impl Into<String>) -> Self {
        Self {
            var,
            value: value.to_owned(),
            expected: expected.into(),
        }
    }
}

fn parse_int<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    var: &'static str,
    value: &str,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let expected = || format!("an integer from {min} to {max}");
    let parsed: T = value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(var, value, expected()))?;
    if parsed < min || parsed > max {
        return Err(ConfigError::new(var, value, expected()));
    }
    Ok(parsed)
}

pub(crate) fn parse_addr(var: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(var, value, "an IP address and port, e.g. 0.0.0.0:5000"))
}

fn comma_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses `TRUSTED_PROXIES`: IPs (taken as single-address networks) and CIDRs.
pub fn parse_trusted_proxies(value: &str) -> Result<Vec<IpNet>, ConfigError> {
    let invalid = |why: String| ConfigError::new("TRUSTED_PROXIES", value, why);
    comma_list(value)
        .map(|item| {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(format!(
                        "comma-separated IPs or CIDRs (e.g. 10.0.0.0/8,192.168.1.7); {item:?} is neither"
                    ))
                })?;
            // Trusting everyone lets every client write its own rate-limit key.
            if net.prefix_len() == 0 {
                return Err(invalid(format!(
                    "the proxies' own addresses; {item:?} trusts every address, so any client could choose its rate-limit key"
                )));
            }
            // 10.1.2.3/8 is most likely a typo for 10.1.2.3/32 or 10.0.0.0/8: say which.
            if net.trunc() != net {
                return Err(invalid(format!(
                    "networks without host bits; {item:?} has them: {} or {}?",
                    net.trunc(),
                    IpNet::from(net.addr())
                )));
            }
            Ok(net)
        })
        .collect()
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl Settings {
    /// The JWT verifier, when a key source is configured.
    fn auth(&self) -> Result<Option<Arc<Authenticator>>, ConfigError> {
        const SOURCES: &str =
            "AUTH_JWT_HS256_SECRET, AUTH_JWT_PUBLIC_KEY_FILE, AUTH_JWT_JWKS_FILE or AUTH_JWT_JWKS_URL";
        let secret = non_empty(&self.auth_jwt_hs256_secret);
        let public_key = non_empty(&self.auth_jwt_public_key_file);
        let jwks_file = non_empty(&self.auth_jwt_jwks_file);
        let jwks_url = non_empty(&self.auth_jwt_jwks_url);
        let (audience, issuer) = (
            non_empty(&self.auth_jwt_audience),
            non_empty(&self.auth_jwt_issuer),
        );
        // (variable, value as an error line may show it)
        let given: Vec<(&'static str, String)> = [
            ("AUTH_JWT_HS256_SECRET", secret.map(|_| REDACTED.to_owned())),
            ("AUTH_JWT_PUBLIC_KEY_FILE", public_key.map(str::to_owned)),
            ("AUTH_JWT_JWKS_FILE", jwks_file.map(str::to_owned)),
            ("AUTH_JWT_JWKS_URL", jwks_url.map(redact_url)),
        ]
        .into_iter()
        .filter_map(|(var, shown)| Some((var, shown?)))
        .collect();
        let (var, shown) = match given.as_slice() {
            [] => {
                return match (audience, issuer) {
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
        let audience = match audience {
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
            hs256_secret: secret,
            public_key_file: public_key.map(Path::new),
            jwks_file: jwks_file.map(Path::new),
            jwks_url,
        };
        Authenticator::new(source, audience, issuer)
            .map(|a| Some(Arc::new(a)))
            .map_err(|expected| ConfigError::new(var, &shown, expected))
    }

    /// Validates every setting, stopping at the first bad one.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let rate_limits = if self.rate_limits.trim().eq_ignore_ascii_case("off") {
            None
        } else {
            Some(Policy::parse(&self.rate_limits).map_err(|why| {
                ConfigError::new(
                    "RATE_LIMITS",
                    &self.rate_limits,
                    format!("`off` or a list like 30/minute,50/hour,200/day ({why})"),
                )
            })?)
        };
        let redis_url = match self.redis_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                // Fail on a typo now rather than on the first request an hour later.
                redis::Client::open(url).map_err(|_| {
                    ConfigError::new(
                        "REDIS_URL",
                        REDACTED,
                        "a redis:// or rediss:// URL, e.g. redis://:password@redis:6379/0",
                    )
                })?;
                Some(url.to_owned())
            }
        };
        let redis_cluster_nodes: Vec<String> =
            comma_list(self.redis_cluster_nodes.as_deref().unwrap_or(""))
                .map(str::to_owned)
                .collect();
        if !redis_cluster_nodes.is_empty() {
            let expected = "comma-separated seed nodes of a Redis Cluster, all redis:// or all \
                rediss:// with the same credentials, \
                e.g. rediss://:password@node-1:6379,rediss://:password@node-2:6379";
            if redis_url.is_some() {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER_NODES",
                    REDACTED,
                    "not to be set together with REDIS_URL: one Redis node (REDIS_URL) or a \
                     Redis Cluster (REDIS_CLUSTER_NODES)",
                ));
            }
            let tcp = redis_cluster_nodes
                .iter()
                .all(|url| url.starts_with("redis://") || url.starts_with("rediss://"));
            if !tcp {
                return Err(ConfigError::new("REDIS_CLUSTER_NODES", REDACTED, expected));
            }
            redis::cluster::ClusterClient::new(redis_cluster_nodes.iter().map(String::as_str))
                .map_err(|_| ConfigError::new("REDIS_CLUSTER_NODES", REDACTED, expected))?;
        }
        let log_format = match self.log_format.trim() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            _ => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    &self.log_format,
                    "json or text",
                ))
            }
        };
        let cors_allowed_origins = comma_list(&self.cors_allowed_origins)
            .map(|origin| {
                let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin
                        .trim_end_matches('/')
                        .contains(|c: char| c.is_whitespace());
                valid
                    .then(|| http::HeaderValue::from_str(origin.trim_end_matches('/')).ok())
                    .flatten()
                    .ok_or_else(|| {
                        ConfigError::new(
                            "CORS_ALLOWED_ORIGINS",
                            &self.cors_allowed_origins,
                            "comma-separated origins like https://app.example.com",
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        let auth = self.auth()?;
        Ok(Config {
            auth,
            listen_addr: parse_addr("LISTEN_ADDR", &self.listen_addr)?,
            admin_listen_addr: match self.admin_listen_addr.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(addr) => Some(parse_addr("ADMIN_LISTEN_ADDR", addr)?),
            },
            max_n: parse_int("MAX_N", &self.max_n, 0, MAX_N_CEILING)?,
            rate_limits,
            trusted_proxies: parse_trusted_proxies(&self.trusted_proxies)?,
            redis_url,
            redis_cluster_nodes,
            redis_timeout: Duration::from_millis(parse_int(
                "REDIS_TIMEOUT_MS",
                &self.redis_timeout_ms,
                1,
                60_000,
            )?),
            cache_max_bytes: parse_int("CACHE_MAX_BYTES", &self.cache_max_bytes, 0, 1 << 40)?,
            shutdown_drain: Duration::from_secs(parse_int(
                "SHUTDOWN_DRAIN_SECONDS",
                &self.shutdown_drain_seconds,
                0,
                3600,
            )?),
            log_format,
            cors_allowed_origins,
            request_timeout: Duration::from_millis(parse_int(
                "REQUEST_TIMEOUT_MS",
                &self.request_timeout_ms,
                1,
                3_600_000,
            )?),
            header_read_timeout: Duration::from_millis(parse_int(
                "HEADER_READ_TIMEOUT_MS",
                &self.header_read_timeout_ms,
                1,
                3_600_000,
            )?),
            max_connections: parse_int("MAX_CONNECTIONS", &self.max_connections, 1, 1_000_000)?,
            max_connections_per_address: parse_int(
                "MAX_CONNECTIONS_PER_ADDRESS",
                &self.max_connections_per_address,
                0,
                1_000_000,
            )?,
            connection_rate_per_address: parse_int(
                "CONNECTION_RATE_PER_ADDRESS",
                &self.connection_rate_per_address,
                0,
                1_000_000,
            )?,
            write_timeout: Duration::from_millis(parse_int(
                "WRITE_TIMEOUT_MS",
                &self.write_timeout_ms,
                1,
                3_600_000,
            )?),
            max_in_flight: parse_int("MAX_IN_FLIGHT", &self.max_in_flight, 1, 1_000_000)?,
            rate_limit_max_keys: parse_int(
                "RATE_LIMIT_MAX_KEYS",
                &self.rate_limit_max_keys,
                64,
                100_000_000,
            )?,
            rate_limit_ipv6_48_factor: parse_int(
                "RATE_LIMIT_IPV6_48_FACTOR",
                &self.rate_limit_ipv6_48_factor,
                0,
                100,
            )?,
        })
    }
}

impl Default for Config {
    /// The contract defaults, without reading the environment (tests build on this).
    fn default() -> Self {
        Settings {
            listen_addr: defaults::LISTEN_ADDR.into(),
            admin_listen_addr: None,
            max_n: defaults::MAX_N.into(),
            rate_limits: defaults::RATE_LIMITS.into(),
            trusted_proxies: String::new(),
            redis_url: None,
            redis_cluster_nodes: None,
            redis_timeout_ms: defaults::REDIS_TIMEOUT_MS.into(),
            cache_max_bytes: defaults::CACHE_MAX_BYTES.into(),
            shutdown_drain_seconds: defaults::SHUTDOWN_DRAIN_SECONDS.into(),
            log_format: defaults::LOG_FORMAT.into(),
            cors_allowed_origins: String::new(),
            request_timeout_ms: defaults::REQUEST_TIMEOUT_MS.into(),
            header_read_timeout_ms: defaults::HEADER_READ_TIMEOUT_MS.into(),
            max_connections: defaults::MAX_CONNECTIONS.into(),
            max_connections_per_address: defaults::MAX_CONNECTIONS_PER_ADDRESS.into(),
            connection_rate_per_address: defaults::CONNECTION_RATE_PER_ADDRESS.into(),
            write_timeout_ms: defaults::WRITE_TIMEOUT_MS.into(),
            max_in_flight: defaults::MAX_IN_FLIGHT.into(),
            rate_limit_max_keys: defaults::RATE_LIMIT_MAX_KEYS.into(),
            rate_limit_ipv6_48_factor: defaults::RATE_LIMIT_IPV6_48_FACTOR.into(),
            auth_jwt_hs256_secret: None,
            auth_jwt_public_key_file: None,
            auth_jwt_jwks_file: None,
            auth_jwt_jwks_url: None,
            auth_jwt_audience: None,
            auth_jwt_issuer: None,
        }
        .into_config()
        .expect("the contract defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["fibonacci-api"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().settings.into_config()
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
