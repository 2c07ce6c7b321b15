//! Graceful shutdown, from outside: real signals, raw TCP, exit statuses and log lines.

mod support;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn in_flight_slow_request_survives_sigterm_and_says_close() {
    let mut server = spawn_server(&["--healthcheck-delay", "1s"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    // The request is in the server's hands once it is accepted and read; SIGTERM now.
    server.signal(libc::SIGTERM);
    let shutting = server
        .wait_for_log("shutting down server", PROMPTLY)
        .unwrap();
    assert_eq!(shutting["signal"], "SIGTERM");
    let response = read_response(&mut stream);
    assert_eq!(response.status, 200);
    assert!(
        response.closes(),
        "the last response says close: {response:?}"
    );
    assert_eq!(response.json()["status"], "available");
    assert!(read_to_close(&mut stream).unwrap().is_empty());
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    let stopped = server.wait_for_log("stopped server", PROMPTLY).unwrap();
    assert_eq!(stopped["addr"], server.addr.to_string());
}

#[test]
fn sigint_drains_like_sigterm() {
    let mut server = spawn_server(&["--healthcheck-delay", "500ms"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    server.signal(libc::SIGINT);
    assert_eq!(
        server
            .wait_for_log("shutting down server", PROMPTLY)
            .unwrap()["signal"],
        "SIGINT"
    );
    assert_eq!(read_response(&mut stream).status, 200);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
}

#[test]
fn new_connections_are_refused_while_draining() {
    let mut server = spawn_server(&["--healthcheck-delay", "3s"]);
    let mut busy = server.connect();
    busy.write_all(HEALTHCHECK).unwrap();
    server.terminate();
    let refused = TcpStream::connect(server.addr);
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused),
        "the listener is closed as the drain begins"
    );
    assert!(
        server.still_running_after(Duration::from_millis(200)),
        "still draining"
    );
    assert_eq!(read_response(&mut busy).status, 200);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
}

#[test]
fn idle_and_never_spoke_connections_are_closed_at_once_on_sigterm() {
    let mut server = spawn_server(&[]);
    let mut idle = server.connect();
    idle.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    let mut silent = server.connect();
    // Make sure the silent one has been accepted: a request on a third connection is answered
    // only after the loop has taken everything queued before it.
    assert_eq!(exchange(&server, HEALTHCHECK).status, 200);

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    assert!(read_to_close(&mut idle).unwrap().is_empty());
    assert!(read_to_close(&mut silent).unwrap().is_empty());
    let status = server.wait_exit(PROMPTLY).and_then(|s| s.code());
    assert_eq!(status, Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "idle connections must not hold the drain open (Go waits 5 s for never-spoke ones): {:?}",
        signalled.elapsed()
    );
}

#[test]
fn half_a_request_on_a_keep_alive_connection_completes_during_the_drain() {
    let mut server = spawn_server(&[]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut stream).status, 200);
    stream
        .write_all(b"GET /v1/healthcheck HTTP/1.1\r\nHo")
        .unwrap();
    // No need to wait for the loop to read it: the drain reads what every connection has
    // pending before it decides which ones are idle.
    server.terminate();
    assert!(
        server.still_running_after(Duration::from_millis(200)),
        "the half request holds the drain"
    );
    stream.write_all(b"st: x\r\n\r\n").unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 200);
    assert!(response.closes());
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
}

#[test]
fn exit_follows_the_last_close_at_once() {
    let mut server = spawn_server(&["--healthcheck-delay", "1s"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    server.terminate();
    read_response(&mut stream);
    let answered = Instant::now();
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(
        answered.elapsed() < Duration::from_millis(500),
        "event driven, no polling interval: {:?}",
        answered.elapsed()
    );
}

#[test]
fn shutdown_deadline_forces_close_logs_error_and_exits_1() {
    let mut server = spawn_server(&["--healthcheck-delay", "30s", "--shutdown-timeout", "500ms"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    server.terminate();
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(1));
    let log = server.final_log();
    assert!(
        log.iter().any(|l| l["level"] == "ERROR"),
        "an ERROR line: {log:?}"
    );
    assert!(!log.iter().any(|l| l["msg"] == "stopped server"));
    assert!(
        read_to_close(&mut stream)
            .map(|rest| rest.is_empty())
            .unwrap_or(true)
    );
}

#[test]
fn second_signal_while_draining_forces_exit_1() {
    let mut server = spawn_server(&["--healthcheck-delay", "30s"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    server.terminate();
    let second = Instant::now();
    server.signal(libc::SIGINT);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(1));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "at once: {:?}",
        second.elapsed()
    );
    let log = server.final_log();
    assert!(log.iter().any(|l| l["level"] == "ERROR"), "{log:?}");
    drop(stream);
}

#[test]
fn sigquit_dumps_the_connection_table_and_exits_2_without_draining() {
    let mut server = spawn_server(&["--healthcheck-delay", "30s"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    let idle = server.connect();
    // A quick request on a third connection: answered once the loop has accepted the others.
    assert_eq!(
        exchange(&server, b"GET /sync HTTP/1.1\r\nHost: x\r\n\r\n").status,
        404
    );
    server.signal(libc::SIGQUIT);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(2));
    let log = server.final_log().to_vec();
    let rows: Vec<_> = log.iter().filter(|l| l["msg"] == "connection").collect();
    let busy_peer = stream.local_addr().unwrap().to_string();
    let idle_peer = idle.local_addr().unwrap().to_string();
    let busy = rows
        .iter()
        .find(|r| r["peer"] == busy_peer.as_str())
        .expect("busy row");
    assert_eq!(busy["state"], "handling");
    assert!(
        busy["bytes_in"].as_u64() == Some(HEALTHCHECK.len() as u64),
        "{busy}"
    );
    assert!(
        busy["age"].as_str().is_some_and(|age| age.ends_with('s')),
        "{busy}"
    );
    for field in ["id", "age_ms", "bytes_out"] {
        assert!(busy[field].is_u64(), "{field} in {busy}");
    }
    assert!(
        rows.iter().any(|r| r["peer"] == idle_peer.as_str()),
        "{rows:?}"
    );
    assert!(!log.iter().any(|l| l["msg"] == "shutting down server"));
    assert!(
        read_to_close(&mut stream)
            .map(|r| r.is_empty())
            .unwrap_or(true)
    );
}

#[test]
fn starting_server_line_means_signals_are_handled() {
    let mut server = spawn_server(&[]);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(server.wait_for_log("stopped server", PROMPTLY).is_some());
}

/// 50 clients hammer keep-alive connections; SIGTERM lands mid-stream. Every request written
/// before the signal is answered, no response is cut short, and the server exits 0.
#[test]
fn fifty_clients_hammering_during_sigterm_lose_nothing() {
    let mut server = spawn_server(&[]);
    let answered = hammer_through_sigterm(&server, 50);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(answered >= 50 * 10);
}
