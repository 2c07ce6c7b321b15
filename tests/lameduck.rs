//! The lame duck (`--drain-delay`): after the first SIGINT/SIGTERM greenlight announces its
//! departure (`shutting down server` at once, /readyz 503, `STOPPING=1`) and keeps accepting and
//! serving for the delay, every response saying `Connection: close` and idle keep-alive
//! connections left open; then the drain of the plain shutdown follows.

mod support;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::*;

/// A server with an admin listener and `--drain-delay 1s` unless `extra` names another.
fn spawn_lame_duck(extra: &[&str]) -> (Server, std::net::SocketAddr) {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--admin-addr", admin.as_str()];
    if !extra.contains(&"--drain-delay") {
        args.extend_from_slice(&["--drain-delay", "1s"]);
    }
    args.extend_from_slice(extra);
    let mut server = spawn_server(&args);
    let admin = admin_addr(&mut server);
    (server, admin)
}

#[test]
fn during_the_delay_requests_are_served_with_close_then_new_connections_are_refused() {
    let (mut server, admin) = spawn_lame_duck(&[]);
    // A keep-alive connection, idle when the signal comes.
    let mut idle = server.connect();
    idle.write_all(HEALTHCHECK).unwrap();
    let first = read_response(&mut idle);
    assert_eq!(first.status, 200);
    assert!(!first.closes());

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let line = server
        .wait_for_log("shutting down server", PROMPTLY)
        .expect("shutting down server");
    assert!(
        signalled.elapsed() < Duration::from_millis(900),
        "logged at once, not after the delay"
    );
    assert_eq!(line["drain_delay"], "1s", "{line}");
    assert_eq!(line["reason"], "signal", "{line}");
    assert_eq!(get(admin, "/readyz").status, 503);

    // Still accepting: a new connection is served, and told to go.
    let fresh = exchange(&server, HEALTHCHECK);
    assert_eq!(fresh.status, 200);
    assert!(fresh.closes(), "{fresh:?}");
    // The connection idle at the signal was kept open: its next request is answered, with close.
    idle.write_all(HEALTHCHECK).unwrap();
    let second = read_response(&mut idle);
    assert_eq!(second.status, 200);
    assert!(second.closes());
    assert!(read_to_close(&mut idle).unwrap().is_empty());
    assert!(
        signalled.elapsed() < Duration::from_secs(1),
        "the checks above ran inside the delay; the machine is too slow for this test"
    );

    // After the delay: refused, and the process exits 0.
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "not before the delay"
    );
    assert!(std::net::TcpStream::connect(server.addr).is_err());
    let log = server.final_log();
    let shutting = log
        .iter()
        .filter(|l| l["msg"] == "shutting down server")
        .count();
    assert_eq!(shutting, 1);
    assert!(log.iter().any(|l| l["msg"] == "stopped server"));
}

#[test]
fn an_idle_connection_left_alone_through_the_delay_is_closed_by_the_drain() {
    let (mut server, _admin) = spawn_lame_duck(&[]);
    let mut idle = server.connect();
    idle.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    assert!(read_to_close(&mut idle).unwrap().is_empty());
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "idle connections stay open through the delay"
    );
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
}

#[test]
fn the_shutdown_timeout_counts_from_the_end_of_the_delay() {
    // A request answered 1.5 s after it arrives, sent at the signal: the drain starts at 1 s
    // and its 1 s timeout ends at 2 s, so the request is answered and the exit is clean. Counted
    // from the signal, the deadline would have forced it at 1 s.
    let (mut server, _admin) =
        spawn_lame_duck(&["--shutdown-timeout", "1s", "--healthcheck-delay", "1500ms"]);
    server.terminate();
    let mut slow = server.connect();
    slow.write_all(HEALTHCHECK).unwrap();
    let response = read_response(&mut slow);
    assert_eq!(response.status, 200);
    assert!(response.closes());
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_second_signal_during_the_delay_forces_exit_1() {
    let (mut server, _admin) = spawn_lame_duck(&["--drain-delay", "30s"]);
    server.terminate();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(1));
    assert!(server.final_log().iter().any(|l| l["level"] == "ERROR"));
}

#[test]
fn sigquit_during_the_delay_dumps_and_exits_2() {
    let (mut server, _admin) = spawn_lame_duck(&["--drain-delay", "30s"]);
    let mut held = server.connect();
    held.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut held).status, 200);
    server.terminate();
    server.signal(libc::SIGQUIT);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(2));
    let peer = held.local_addr().unwrap().to_string();
    assert!(
        server
            .final_log()
            .iter()
            .any(|l| l["msg"] == "connection" && l["peer"] == peer.as_str())
    );
}

#[test]
fn systemd_hears_stopping_with_the_lame_duck_status() {
    let dir = std::env::temp_dir().join(format!("greenlight-lameduck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(PROMPTLY)).unwrap();
    let path = path.to_str().unwrap().to_string();
    let mut server = spawn_server_with_env(&["--drain-delay", "1s"], &[("NOTIFY_SOCKET", &path)]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("READY=1"));
    server.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "STOPPING=1\nSTATUS=lame duck: draining in 1s\n"
    );
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    std::fs::remove_dir_all(dir).ok();
}
