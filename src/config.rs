//! Command-line flags and their `GREENLIGHT_*` environment variables -> [`Config`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::capacity::{MAX_CONNECTIONS_CEILING, MaxConnections};
use crate::http::Limits;
use crate::http::limits;

/// Most worker loops: far more than the cores of any machine greenlight runs on; a bigger
/// number is a typo, and each worker costs a thread, an epoll and a wake-up descriptor.
pub const MAX_WORKERS: usize = 1024;

/// How many worker loops to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One per CPU this process may run on (affinity mask and cgroup quota).
    Auto,
    /// Exactly this many (1 to [`MAX_WORKERS`]).
    Count(usize),
}

impl Workers {
    /// The number of workers to start.
    pub fn resolve(self) -> usize {
        match self {
            Workers::Auto => std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(MAX_WORKERS),
            Workers::Count(n) => n,
        }
    }
}

/// `auto`, or a worker count from 1 to [`MAX_WORKERS`].
fn parse_workers(text: &str) -> Result<Workers, String> {
    if text == "auto" {
        return Ok(Workers::Auto);
    }
    match parse_count(text) {
        Some(n) if (1..=MAX_WORKERS).contains(&n) => Ok(Workers::Count(n)),
        _ => Err(format!(
            "invalid worker count {text:?}: expected auto or 1 to {MAX_WORKERS}"
        )),
    }
}

/// The running environment, reported by the healthcheck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Local development.
    Development,
    /// Pre-production.
    Staging,
    /// Production.
    Production,
}

impl Environment {
    /// The name as it appears in flags, logs and the healthcheck.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (slog-term).
    Term,
    /// One JSON object per line, with `msg`, `level` and `ts`.
    Json,
}

/// The lowest level that is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Per-connection events too.
    Debug,
    /// Life-cycle events and problems.
    Info,
    /// Problems only.
    Warning,
    /// Failures only.
    Error,
}

/// Everything the server is told at start-up. Each flag can also come from the environment
/// variable named beside it; a flag given on the command line wins.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "greenlight",
    version,
    about = "The Greenlight healthcheck API, with a graceful shutdown that loses nothing"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "GREENLIGHT_HOST",
        default_value = "0.0.0.0",
        value_name = "IP"
    )]
    pub host: IpAddr,

    /// Port to listen on; 0 picks a free one (the `starting server` log line shows it).
    #[arg(
        long,
        env = "GREENLIGHT_PORT",
        default_value_t = 4000,
        allow_negative_numbers = true
    )]
    pub port: u16,

    /// Environment reported by the healthcheck.
    #[arg(long, env = "GREENLIGHT_ENV", value_enum, default_value_t = Environment::Development, value_name = "NAME")]
    pub env: Environment,

    /// Address of the admin listener (`/readyz`, `/livez`), IPv4 `ADDR:PORT` or `[IPv6]:PORT`;
    /// off unless given (or passed by systemd as a socket named `admin`).
    #[arg(long, env = "GREENLIGHT_ADMIN_ADDR", value_name = "ADDR:PORT")]
    pub admin_addr: Option<SocketAddr>,

    /// Lame duck after SIGINT/SIGTERM: keep accepting and serving this long (every response
    /// saying `Connection: close`, /readyz saying 503) so load balancers move away, then drain.
    #[arg(long, env = "GREENLIGHT_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration, value_name = "DUR")]
    pub drain_delay: Duration,

    /// How long an upgrade (SIGHUP) waits for the new process to be ready before giving up,
    /// killing it, and serving on.
    #[arg(long, env = "GREENLIGHT_UPGRADE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DUR")]
    pub upgrade_timeout: Duration,

    /// Grace period for in-flight requests after SIGINT/SIGTERM (after the drain delay).
    #[arg(long, env = "GREENLIGHT_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DUR")]
    pub shutdown_timeout: Duration,

    /// A request (head and body) must arrive within this, counted from its first byte (from
    /// the accept for a new connection); else 408. 0 disables it.
    #[arg(long, env = "GREENLIGHT_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DUR")]
    pub read_timeout: Duration,

    /// A response must be written within this, else the connection is closed. 0 disables it.
    #[arg(long, env = "GREENLIGHT_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DUR")]
    pub write_timeout: Duration,

    /// A keep-alive connection idle this long is closed. 0 disables it.
    #[arg(long, env = "GREENLIGHT_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration, value_name = "DUR")]
    pub idle_timeout: Duration,

    /// The healthcheck answers after this delay, without blocking the loop (a demo of draining).
    #[arg(long, env = "GREENLIGHT_HEALTHCHECK_DELAY", default_value = "0s", value_parser = parse_duration, value_name = "DUR")]
    pub healthcheck_delay: Duration,

    /// Log line format.
    #[arg(long, env = "GREENLIGHT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Term)]
    pub log_format: LogFormat,

    /// Lowest level logged.
    #[arg(long, env = "GREENLIGHT_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Longest request line (method, target, version) in bytes, else 414.
    #[arg(long, env = "GREENLIGHT_MAX_REQUEST_LINE", allow_negative_numbers = true, default_value_t = limits::MAX_REQUEST_LINE_BYTES, value_parser = parse_head_limit, value_name = "BYTES")]
    pub max_request_line: usize,

    /// Largest request header section in bytes, request line included, else 431.
    #[arg(long, env = "GREENLIGHT_MAX_HEADER_BYTES", allow_negative_numbers = true, default_value_t = limits::MAX_HEAD_BYTES, value_parser = parse_head_limit, value_name = "BYTES")]
    pub max_header_bytes: usize,

    /// Largest request body in bytes, else 413 (decided from Content-Length before the body is read).
    #[arg(long, env = "GREENLIGHT_MAX_BODY_BYTES", allow_negative_numbers = true, default_value_t = limits::MAX_BODY_BYTES, value_name = "BYTES")]
    pub max_body_bytes: u64,

    /// Worker loops (threads), each serving its share of the connections; `auto` runs one per
    /// CPU this process may use.
    #[arg(long, env = "GREENLIGHT_WORKERS", allow_negative_numbers = true, default_value = "auto", value_parser = parse_workers, value_name = "N|auto")]
    pub workers: Workers,

    /// Connections held at once by the whole process; a connection over it is closed at once.
    /// `auto`: as many as the descriptor limit allows (greenlight raises its soft limit to the
    /// hard one); a number above that is lowered to it, with a warning.
    #[arg(long, env = "GREENLIGHT_MAX_CONNECTIONS", allow_negative_numbers = true, default_value = "auto", value_parser = parse_max_connections, value_name = "N|auto")]
    pub max_connections: MaxConnections,
}

impl Config {
    /// Parses the process's arguments and environment; exits with clap's message (status 2)
    /// on error, including flags that contradict each other.
    pub fn from_args() -> Config {
        let config = Config::parse();
        if let Err(message) = config.check() {
            let mut command = <Config as clap::CommandFactory>::command();
            command
                .error(clap::error::ErrorKind::ArgumentConflict, message)
                .exit();
        }
        config
    }

    /// What clap cannot check flag by flag: the admin listener must not take the API's address.
    pub fn check(&self) -> Result<(), String> {
        let Some(admin) = self.admin_addr else {
            return Ok(());
        };
        let api = SocketAddr::new(self.host, self.port);
        let overlaps = admin.port() == api.port()
            && api.port() != 0
            && (admin.ip() == api.ip() || admin.ip().is_unspecified() || api.ip().is_unspecified());
        if overlaps {
            return Err(format!(
                "--admin-addr {admin} is the API's address ({api}, from --host and --port): give the admin listener a port of its own"
            ));
        }
        Ok(())
    }

    /// The request limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_request_line: self.max_request_line,
            max_head: self.max_header_bytes,
            max_body: self.max_body_bytes,
            ..Limits::default()
        }
    }
}

/// A head limit: from 256 bytes (a request line and a Host header) to the ceiling the read
/// buffer allows.
fn parse_head_limit(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (256..=limits::MAX_HEAD_CEILING_BYTES).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid byte count {text:?}: expected 256 to {}",
            limits::MAX_HEAD_CEILING_BYTES
        )),
    }
}

/// A zero duration means "no timeout" for the read, write and idle timeouts.
pub fn enabled(timeout: Duration) -> Option<Duration> {
    (!timeout.is_zero()).then_some(timeout)
}

/// `auto`, or at least one connection and at most a million (a descriptor each).
fn parse_max_connections(text: &str) -> Result<MaxConnections, String> {
    if text == "auto" {
        return Ok(MaxConnections::Auto);
    }
    match parse_count(text) {
        Some(n) if (1..=MAX_CONNECTIONS_CEILING).contains(&n) => Ok(MaxConnections::Count(n)),
        _ => Err(format!(
            "invalid connection count {text:?}: expected auto or 1 to {MAX_CONNECTIONS_CEILING}"
        )),
    }
}

/// A count written in decimal digits only (`str::parse` also takes `+4`).
fn parse_count(text: &str) -> Option<usize> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses durations such as `250ms`, `5s`, `1m`, `1h`, `1m30s`, `1.5s` and `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("invalid duration {text:?}: expected a number with a unit, such as 250ms, 5s or 1m")
    };
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let value: f64 = number.parse().map_err(|_| invalid())?;
        if number.starts_with('.') || number.ends_with('.') {
            return Err(invalid());
        }
        let seconds_per_unit = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        let part = Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| invalid())?;
        total = total.checked_add(part).ok_or_else(invalid)?;
        rest = tail;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_table() {
        let ok: &[(&str, Duration)] = &[
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(*expected), "{text}");
        }
        for bad in ["", "5", "s", "5x", "-1s", "1.s", ".5s", "5 s", "ms", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = Config::try_parse_from(["greenlight"]).unwrap();
        assert_eq!(config.port, 4000);
        assert_eq!(config.host.to_string(), "0.0.0.0");
        assert_eq!(config.env, Environment::Development);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.read_timeout, Duration::from_secs(5));
        assert_eq!(config.write_timeout, Duration::from_secs(10));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.healthcheck_delay, Duration::ZERO);
        assert_eq!(config.log_format, LogFormat::Term);
        // From the definition, not a parse: CI runs the suites with GREENLIGHT_WORKERS set.
        let command = <Config as clap::CommandFactory>::command();
        let workers = command
            .get_arguments()
            .find(|arg| arg.get_id() == "workers")
            .unwrap();
        assert_eq!(workers.get_default_values(), ["auto"]);
        let cap = command
            .get_arguments()
            .find(|arg| arg.get_id() == "max_connections")
            .unwrap();
        assert_eq!(cap.get_default_values(), ["auto"]);
    }

    #[test]
    fn the_admin_listener_must_not_take_the_api_address() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(["greenlight"].iter().chain(args.iter())).unwrap()
        };
        let same = parse(&[
            "--host",
            "127.0.0.1",
            "--port",
            "4000",
            "--admin-addr",
            "127.0.0.1:4000",
        ]);
        assert!(same.check().unwrap_err().contains("--admin-addr"));
        let wildcard = parse(&["--port", "4000", "--admin-addr", "127.0.0.1:4000"]);
        assert!(
            wildcard.check().is_err(),
            "0.0.0.0:4000 covers 127.0.0.1:4000"
        );
        let other_port = parse(&["--port", "4000", "--admin-addr", "127.0.0.1:4001"]);
        assert!(other_port.check().is_ok());
        let v6 = parse(&["--port", "4000", "--admin-addr", "[::1]:9000"]);
        assert_eq!(v6.admin_addr, Some("[::1]:9000".parse().unwrap()));
        assert!(Config::try_parse_from(["greenlight", "--admin-addr", "localhost"]).is_err());
        assert!(parse(&[]).admin_addr.is_none(), "off by default");
        assert_eq!(parse(&[]).drain_delay, Duration::ZERO);
    }

    #[test]
    fn connection_caps_table() {
        assert_eq!(parse_max_connections("auto"), Ok(MaxConnections::Auto));
        assert_eq!(parse_max_connections("2"), Ok(MaxConnections::Count(2)));
        for bad in ["0", "1000001", "+5", "", "many"] {
            assert!(parse_max_connections(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn worker_counts_table() {
        assert_eq!(parse_workers("auto"), Ok(Workers::Auto));
        assert_eq!(parse_workers("1"), Ok(Workers::Count(1)));
        assert_eq!(parse_workers("1024"), Ok(Workers::Count(1024)));
        for bad in ["0", "1025", "-1", "", "two", "Auto", "4 ", "+4"] {
            assert!(parse_workers(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Workers::Auto.resolve() >= 1);
        assert_eq!(Workers::Count(3).resolve(), 3);
    }
}
