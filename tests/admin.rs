//! The admin listener: `/readyz` and `/livez` with the API's HTTP rules, open through the drain,
//! never holding up the exit; its flags and start-up errors.

mod support;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn admin_args(port: u16) -> Vec<String> {
    vec!["--admin-addr".into(), format!("127.0.0.1:{port}")]
}

fn spawn_with_admin(extra: &[&str]) -> (Server, std::net::SocketAddr) {
    let port = free_port();
    let mut args: Vec<String> = admin_args(port);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = spawn_server(&args);
    let admin = admin_addr(&mut server);
    assert_eq!(admin.port(), port);
    (server, admin)
}

#[test]
fn readyz_and_livez_answer_200_while_serving() {
    let (_server, admin) = spawn_with_admin(&[]);
    let ready = get(admin, "/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), serde_json::json!({"status": "ready"}));
    let live = get(admin, "/livez");
    assert_eq!(live.status, 200);
    assert_eq!(live.json(), serde_json::json!({"status": "alive"}));
    assert_eq!(live.header("content-type"), Some("application/json"));
    assert_eq!(live.header("cache-control"), Some("no-store"));
}

#[test]
fn head_is_get_without_a_body_and_other_paths_and_methods_are_404_and_405() {
    let (_server, admin) = spawn_with_admin(&[]);
    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    stream
        .write_all(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = read_response_from(&mut stream, true).unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let missing = get(admin, "/v1/healthcheck");
    assert_eq!(
        missing.status, 404,
        "the API is not served on the admin port"
    );
    assert!(missing.json()["error"].is_string());
    let post = request_to(
        admin,
        b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert!(post.json()["error"].is_string());
}

#[test]
fn the_admin_listener_uses_the_api_limits() {
    let (_server, admin) = spawn_with_admin(&["--max-request-line", "256"]);
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300));
    assert_eq!(request_to(admin, long.as_bytes()).status, 414);
    assert_eq!(
        request_to(admin, b"GET /readyz HTTP/1.1\r\n\r\n").status,
        400,
        "Host is required as on the API"
    );
}

#[test]
fn readyz_turns_503_at_sigterm_and_the_admin_listener_stays_open_through_the_drain() {
    let (mut server, admin) = spawn_with_admin(&["--healthcheck-delay", "1500ms"]);
    let mut slow = server.connect();
    slow.write_all(HEALTHCHECK).unwrap();
    // An idle keep-alive admin connection: it must not hold up the exit.
    let mut idle_probe = std::net::TcpStream::connect(admin).unwrap();
    idle_probe
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle_probe).status, 200);
    // The slow request is in its handler once a later request on another connection is done.
    assert_eq!(get(server.addr, "/nowhere").status, 404);

    server.terminate();
    let draining = get(admin, "/readyz");
    assert_eq!(draining.status, 503);
    assert_eq!(draining.json(), serde_json::json!({"status": "draining"}));
    assert_eq!(get(admin, "/livez").status, 200, "draining is not dead");

    let answered = read_response(&mut slow);
    assert_eq!(answered.status, 200);
    let answered_at = Instant::now();
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(
        answered_at.elapsed() < Duration::from_secs(2),
        "the idle admin connection held up the exit"
    );
}

#[test]
fn livez_says_stalled_when_a_worker_loop_stops_turning_and_alive_when_it_turns_again() {
    let (server, admin) = spawn_with_admin(&["--workers", "2"]);
    let tids = thread_ids(server.pid, "worker-1");
    assert_eq!(tids.len(), 1, "one worker-1 thread");
    {
        let _stuck = StoppedThread::stop(tids[0]);
        let end = Instant::now() + PROMPTLY;
        let stalled = loop {
            let live = get(admin, "/livez");
            if live.status == 503 {
                break live;
            }
            assert!(Instant::now() < end, "livez never said stalled");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(stalled.json(), serde_json::json!({"status": "stalled"}));
        assert_eq!(get(admin, "/readyz").status, 200, "stalled is not draining");
    }
    let end = Instant::now() + PROMPTLY;
    while get(admin, "/livez").status != 200 {
        assert!(Instant::now() < end, "livez never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_admin_address_comes_from_the_environment_and_may_be_ipv6() {
    let port = free_port();
    let v6 = format!("[::1]:{port}");
    let Ok(probe) = std::net::TcpListener::bind(v6.as_str()) else {
        return; // no IPv6 loopback on this machine: nothing to check
    };
    drop(probe);
    let mut server = spawn_server_with_env(&[], &[("GREENLIGHT_ADMIN_ADDR", &v6)]);
    let admin = admin_addr(&mut server);
    assert!(admin.is_ipv6(), "{admin}");
    assert_eq!(get(admin, "/readyz").status, 200);
}

#[test]
fn an_admin_address_in_use_is_a_clean_exit_1_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_greenlight"))
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
        .args(["--admin-addr", &addr])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    let critical = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["level"] == "CRITICAL")
        .unwrap_or_else(|| panic!("a CRITICAL line: {text}"));
    assert!(critical.to_string().contains(&addr), "{critical}");
}

#[test]
fn the_admin_listener_on_the_api_address_is_refused_with_exit_2() {
    let port = free_port().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_greenlight"))
        .args(["--host", "127.0.0.1", "--port", &port])
        .args(["--admin-addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--admin-addr"));
}

#[test]
fn admin_connections_over_the_cap_are_closed_at_once() {
    let (mut server, admin) = spawn_with_admin(&[]);
    // Sixteen held open (each answered once, so each was taken in), then one more.
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut stream = std::net::TcpStream::connect(admin).unwrap();
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut stream).status, 200);
        held.push(stream);
    }
    let mut over = std::net::TcpStream::connect(admin).unwrap();
    over.set_read_timeout(Some(PROMPTLY)).unwrap();
    let _ = over.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        read_response_from(&mut over, false).is_err(),
        "closed unanswered"
    );
    let warning = server
        .wait_for_log("too many admin connections, closing new ones", PROMPTLY)
        .expect("a WARNING");
    assert_eq!(warning["max"], 16);
    drop(held);
    // The API is not affected.
    assert_eq!(exchange(&server, HEALTHCHECK).status, 200);
}
