//! Running out of file descriptors: the loop must not spin, must log once, and must recover by
//! itself once descriptors free up. The connection cap follows the descriptor limit found at
//! start-up, so the limit is lowered under the running server (as `prlimit --nofile` would).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// Descriptors for the server: 3 standard ones, the supervisor's epoll, waker and signal pipe
/// (2), the listener and the admin listener, two per worker, leaving room for a dozen or more
/// connections.
const FD_LIMIT: u64 = 28;

#[test]
fn out_of_descriptors_pauses_accepting_without_spinning_and_recovers() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut server = spawn_server(&["--admin-addr", &admin]);
    let admin = admin_addr(&mut server);
    set_fd_limit(server.pid, FD_LIMIT, FD_LIMIT);

    // Fill every descriptor the server has; connections beyond wait in the listen queue.
    let mut served = Vec::new();
    loop {
        let mut stream = server.connect();
        stream.write_all(HEALTHCHECK).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match read_response_from(&mut stream, false) {
            Ok(response) => {
                assert_eq!(response.status, 200);
                served.push(stream);
            }
            Err(_) => {
                served.push(stream);
                break;
            }
        }
        assert!(served.len() < 100, "the descriptor limit never bit");
    }
    let waiting = served.pop().unwrap();
    let exhausted = server
        .wait_for_log("cannot accept, pausing until descriptors free up", PROMPTLY)
        .expect("the exhaustion is logged");
    assert!(
        exhausted["error"]
            .as_str()
            .unwrap()
            .contains("Too many open files"),
        "{exhausted}"
    );

    // While exhausted, with a connection queued, the loop must be nearly idle: a spinning
    // loop would burn a whole core (1 s of CPU per second).
    let window = Duration::from_secs(1);
    let before = cpu_seconds(server.pid);
    let started = Instant::now();
    std::thread::sleep(window);
    let used = cpu_seconds(server.pid) - before;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        used < 0.2 * elapsed,
        "used {used:.2} s of CPU in {elapsed:.2} s while out of descriptors"
    );

    // Free some descriptors: the queued connection is accepted and answered on its own.
    drop(served.drain(..5).collect::<Vec<TcpStream>>());
    let mut waiting = waiting;
    waiting.set_read_timeout(Some(PROMPTLY)).unwrap();
    assert_eq!(read_response(&mut waiting).status, 200);
    server
        .wait_for_log("accepting again", PROMPTLY)
        .expect("recovery is logged");
    let log = server.log(Duration::ZERO);
    let episodes = log
        .iter()
        .filter(|l| l["msg"] == "cannot accept, pausing until descriptors free up")
        .count();
    assert_eq!(episodes, 1, "one log line per episode, not one per retry");
    assert_eq!(exchange(&server, HEALTHCHECK).status, 200);
    // Counted: every pause, not every episode.
    let metrics = String::from_utf8(get(admin, "/metrics").body).unwrap();
    let pauses: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("greenlight_accept_pauses_total "))
        .expect("the accept pauses series")
        .parse()
        .unwrap();
    assert!(pauses >= 1.0, "{pauses}");
}
