//! The command line and environment, from outside.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use support::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greenlight"));
    command.args(args).stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run greenlight")
}

#[test]
fn version_prints_the_crate_version() {
    let output = run(&["--version"], &[]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert_eq!(run(&["-V"], &[]).stdout, output.stdout);
}

#[test]
fn help_lists_every_flag() {
    let output = run(&["--help"], &[]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--host",
        "--port",
        "--env",
        "--shutdown-timeout",
        "--read-timeout",
        "--write-timeout",
        "--idle-timeout",
        "--healthcheck-delay",
        "--log-format",
        "--max-connections",
        "--version",
        "GREENLIGHT_PORT",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn bad_values_exit_non_zero_at_once_with_a_message() {
    type Row<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let rows: &[Row] = &[
        (&["--shutdown-timeout", "soon"], &[], "shutdown-timeout"),
        (&["--read-timeout", "5"], &[], "read-timeout"),
        (&["--port", "70000"], &[], "port"),
        (&["--env", "prod"], &[], "env"),
        (&["--log-format", "xml"], &[], "log-format"),
        (&["--host", "localhost:80"], &[], "host"),
        (&["--max-connections", "0"], &[], "max-connections"),
        // A negative number is a bad value of its flag, not an unknown flag.
        (&["--max-connections", "-5"], &[], "max-connections"),
        (&["--port", "-1"], &[], "port"),
        (&["--max-body-bytes", "-3"], &[], "max-body-bytes"),
        (&["--no-such-flag"], &[], "no-such-flag"),
        (&[], &[("GREENLIGHT_PORT", "eighty")], "port"),
        (&[], &[("GREENLIGHT_IDLE_TIMEOUT", "1y")], "idle-timeout"),
    ];
    for (args, env, mentions) in rows {
        let output = run(args, env);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(mentions), "{args:?}: {text}");
    }
}

#[test]
fn flags_come_from_the_environment_too() {
    let mut server = spawn_server_with_env(
        &[],
        &[
            ("GREENLIGHT_ENV", "production"),
            ("GREENLIGHT_HEALTHCHECK_DELAY", "250ms"),
        ],
    );
    let started = server.wait_for_log("starting server", PROMPTLY).unwrap();
    assert_eq!(started["env"], "production");
    let response = exchange(&server, HEALTHCHECK);
    assert_eq!(response.json()["system_info"]["environment"], "production");
}

/// The first line the server logs when started on 127.0.0.1:0 with `env` set (no --log-format).
fn first_log_line(env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greenlight"));
    command
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    send_signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    first
}

#[test]
fn log_format_from_the_environment_selects_json() {
    let first = first_log_line(&[("GREENLIGHT_LOG_FORMAT", "json")]);
    let line: serde_json::Value = serde_json::from_str(&first).expect("a JSON line");
    assert_eq!(line["msg"], "starting server");
    assert_eq!(line["level"], "INFO");
    assert!(line["ts"].is_string());
    assert!(line["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
}

#[test]
fn term_log_format_is_for_people() {
    let first = first_log_line(&[]);
    assert!(first.contains("starting server"), "{first}");
    assert!(first.contains("addr: 127.0.0.1:"), "{first}");
    assert!(serde_json::from_str::<serde_json::Value>(&first).is_err());
}

#[test]
fn port_in_use_fails_to_start_with_exit_1() {
    let server = spawn_server(&[]);
    let port = server.addr.port().to_string();
    let output = run(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--log-format",
            "json",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("cannot start server"), "{text}");
    assert!(
        text.to_lowercase().contains("address already in use"),
        "{text}"
    );
}

#[test]
fn max_connections_closes_the_connection_over_the_limit() {
    let server = spawn_server(&["--max-connections", "2"]);
    let mut first = server.connect();
    let mut second = server.connect();
    first.write_all_ok(HEALTHCHECK);
    second.write_all_ok(HEALTHCHECK);
    assert_eq!(read_response(&mut first).status, 200);
    assert_eq!(read_response(&mut second).status, 200);
    let mut third = server.connect();
    let rest = read_to_close(&mut third);
    assert!(
        rest.map(|r| r.is_empty()).unwrap_or(true),
        "closed without an answer"
    );
    drop(first);
    // Once one closes, a new connection is served again. The worker frees the closed one
    // asynchronously and nothing outside shows when, so retry for a bounded time.
    let end = std::time::Instant::now() + PROMPTLY;
    let served = loop {
        let mut stream = server.connect();
        stream.write_all_ok(HEALTHCHECK);
        if support::read_response_from(&mut stream, false).is_ok() {
            break true;
        }
        if std::time::Instant::now() > end {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(served, "a freed slot is used again");
}

trait WriteAllOk {
    fn write_all_ok(&mut self, bytes: &[u8]);
}

impl WriteAllOk for std::net::TcpStream {
    fn write_all_ok(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.write_all(bytes).unwrap();
    }
}
