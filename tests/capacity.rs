//! Capacity out of the box: greenlight raises its soft descriptor limit to the hard one, caps
//! connections by what that limit allows, and says so when an explicit cap is too high.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

fn starting_line(server: &mut Server) -> serde_json::Value {
    server
        .wait_for_log("starting server", PROMPTLY)
        .expect("starting server")
}

#[test]
fn a_low_soft_limit_is_raised_to_the_hard_limit_and_a_thousand_idle_connections_are_held() {
    let mut server = spawn_server_with_fd_limits(&[], 64, 4096);
    let started = starting_line(&mut server);
    assert_eq!(started["max_fds"], 4096, "{started}");
    let cap = started["max_connections"]
        .as_u64()
        .expect("max_connections");
    assert!((1000..4096).contains(&cap), "{started}");

    // Each connection is answered (so it was accepted and adopted), then stays open, idle.
    let mut held = Vec::new();
    for _ in 0..1000 {
        let mut stream = server.connect();
        stream.write_all(HEALTHCHECK).unwrap();
        assert_eq!(read_response(&mut stream).status, 200);
        held.push(stream);
    }
    // All still open: one more request on each is answered.
    for stream in &mut held {
        stream.write_all(HEALTHCHECK).unwrap();
        assert_eq!(read_response(stream).status, 200);
    }
    let log = server.log(Duration::ZERO);
    assert!(
        !log.iter().any(|l| l["level"] == "WARNING"),
        "no warning expected: {log:?}"
    );
}

#[test]
fn a_hard_limit_of_64_caps_connections_below_it() {
    let mut server = spawn_server_with_fd_limits(&[], 64, 64);
    let started = starting_line(&mut server);
    assert_eq!(started["max_fds"], 64, "{started}");
    let cap = started["max_connections"]
        .as_u64()
        .expect("max_connections");
    assert!((1..64).contains(&cap), "{started}");
    // The cap holds: every connection up to it is served, the next one is closed unanswered.
    let mut held = Vec::new();
    for _ in 0..cap {
        let mut stream = server.connect();
        stream.write_all(HEALTHCHECK).unwrap();
        assert_eq!(read_response(&mut stream).status, 200);
        held.push(stream);
    }
    let mut over = server.connect();
    let _ = over.write_all(HEALTHCHECK);
    assert!(read_response_from(&mut over, false).is_err());
    assert!(
        server
            .wait_for_log("max connections reached, closing new connections", PROMPTLY)
            .is_some()
    );
}

#[test]
fn asking_for_more_connections_than_the_limit_allows_warns_with_both_numbers() {
    let mut server = spawn_server_with_fd_limits(&["--max-connections", "1000"], 64, 64);
    let started = starting_line(&mut server);
    let cap = started["max_connections"].as_u64().unwrap();
    assert!(cap < 64, "{started}");
    let warning = server
        .log(Duration::ZERO)
        .iter()
        .find(|l| l["level"] == "WARNING")
        .cloned()
        .expect("a WARNING line");
    assert_eq!(warning["asked"], 1000, "{warning}");
    assert_eq!(warning["max_connections"], cap, "{warning}");
    let text = warning.to_string();
    assert!(
        text.contains("LimitNOFILE=") && text.contains("ulimit -Hn"),
        "{warning}"
    );
    let warnings = server
        .log(Duration::ZERO)
        .iter()
        .filter(|l| l["level"] == "WARNING")
        .count();
    assert_eq!(warnings, 1, "one warning");
}

#[test]
fn more_workers_than_the_descriptor_limit_holds_is_a_clean_exit_1_saying_why() {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_greenlight"));
    command.args([
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-format",
        "json",
        "--workers",
        "1024",
    ]);
    limit_fds(&mut command, 1024, 1024);
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("CRITICAL") && text.contains("--workers 1024"),
        "{text}"
    );
}
