//! Many worker loops, from outside: the `--workers` flag and its environment variable, the
//! worker threads, how connections are dealt to them, and one shutdown for the whole process
//! whatever the worker count.
//!
//! Which worker holds a connection is read from the log: the `accepted` lines of
//! `--log-level debug`, or the SIGQUIT connection table; both carry a `worker` field.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The start of a request the server cannot answer until the rest arrives.
const HALF_REQUEST: &[u8] = b"GET /v1/healthcheck HTTP/1.1\r\nHo";

/// The rest of [`HALF_REQUEST`].
const REST_OF_REQUEST: &[u8] = b"st: x\r\n\r\n";

/// A request answered at once whatever `--healthcheck-delay` says, on a kept-alive connection.
const QUICK: &[u8] = b"GET /sync HTTP/1.1\r\nHost: x\r\n\r\n";

/// The names of the process's threads called `worker-*`, in index order.
fn worker_threads(pid: i32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_string())
        .filter(|name| name.starts_with("worker-"))
        .collect();
    names.sort_by_key(|name| {
        name["worker-".len()..]
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    names
}

/// `worker-0` .. `worker-{n-1}`.
fn worker_names(n: usize) -> Vec<String> {
    (0..n).map(|index| format!("worker-{index}")).collect()
}

/// This (test) process's `available_parallelism`; a child inherits its affinity and cgroup.
fn available_parallelism() -> u64 {
    thread::available_parallelism().unwrap().get() as u64
}

/// The `workers` field of the `starting server` line.
fn started_workers(server: &mut Server) -> Option<u64> {
    server
        .wait_for_log("starting server", PROMPTLY)
        .expect("starting server")["workers"]
        .as_u64()
}

/// Occurrences of lines whose `msg` is `msg`.
fn count(log: &[Value], msg: &str) -> usize {
    log.iter().filter(|line| line["msg"] == msg).count()
}

/// Opens a connection and has one request answered on it: from then on a worker holds it.
fn adopted_connection(server: &Server) -> TcpStream {
    let mut stream = server.connect();
    stream.write_all(QUICK).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 404, "{response:?}");
    assert!(!response.closes(), "kept alive: {response:?}");
    stream
}

fn peer_of(stream: &TcpStream) -> String {
    stream.local_addr().unwrap().to_string()
}

/// The worker index of each peer, from the `accepted` lines of `--log-level debug`, waiting
/// until every peer has one.
fn workers_of(server: &mut Server, peers: &[String]) -> Vec<u64> {
    let end = Instant::now() + PROMPTLY;
    loop {
        let log = server.log(Duration::from_millis(20));
        let found: Vec<u64> = peers
            .iter()
            .filter_map(|peer| {
                log.iter()
                    .find(|line| line["msg"] == "accepted" && line["peer"] == peer.as_str())
                    .map(|line| line["worker"].as_u64().expect("an integer worker field"))
            })
            .collect();
        if found.len() == peers.len() {
            return found;
        }
        assert!(
            Instant::now() < end,
            "not every connection was accepted: {} of {}; log: {log:?}",
            found.len(),
            peers.len()
        );
    }
}

/// SIGQUIT, exit 2, and the worker index of each peer in the connection table (`None` for a
/// peer the table does not list).
fn quit_and_read_table(server: &mut Server, peers: &[String]) -> Vec<Option<u64>> {
    server.signal(libc::SIGQUIT);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(2));
    let log = server.final_log();
    peers
        .iter()
        .map(|peer| {
            let rows: Vec<&Value> = log
                .iter()
                .filter(|line| line["msg"] == "connection" && line["peer"] == peer.as_str())
                .collect();
            assert!(rows.len() <= 1, "one row per connection: {rows:?}");
            rows.first()
                .map(|row| row["worker"].as_u64().expect("an integer worker field"))
        })
        .collect()
}

/// The connection ends without a byte of response (the server closed or reset it).
fn assert_unanswered(stream: &mut TcpStream) {
    match read_response_from(stream, false) {
        Ok(response) => panic!("answered: {response:?}"),
        Err(partial) => assert!(
            partial.is_empty(),
            "part of a response: {:?}",
            String::from_utf8_lossy(&partial)
        ),
    }
}

/// Runs the binary to its exit, which must come at once (a value wrongly accepted would start
/// a server; it is killed and the test fails).
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greenlight"));
    command
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().expect("spawn greenlight");
    let pid = child.id() as i32;
    let (done, output) = channel();
    thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(PROMPTLY) {
        Ok(output) => output.expect("wait for greenlight"),
        Err(_) => {
            send_signal(pid, libc::SIGKILL);
            panic!("{args:?} {env:?} was accepted: the server started");
        }
    }
}

/// A server started from a command built by the test, for what `support` cannot do: clear
/// `GREENLIGHT_WORKERS` (CI may set it), or run a step in the child before `exec`. Killed
/// when dropped.
struct Bare {
    pid: i32,
    child: Child,
}

impl Bare {
    /// Adds `--host 127.0.0.1 --port 0 --log-format json`, spawns, and returns the process
    /// with its `starting server` line.
    fn start(mut command: Command) -> (Bare, Value) {
        command
            .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn greenlight");
        let stderr = child.stderr.take().expect("stderr");
        let bare = Bare {
            pid: child.id() as i32,
            child,
        };
        let (line_tx, lines) = channel();
        thread::spawn(move || {
            // Read to the end, so the child never blocks on a full pipe.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = line_tx.send(serde_json::from_str(&line).unwrap_or(Value::String(line)));
            }
        });
        let end = Instant::now() + PROMPTLY;
        let mut seen = Vec::new();
        loop {
            match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(line) if line["msg"] == "starting server" => return (bare, line),
                Ok(line) => seen.push(line),
                Err(_) => panic!("no starting server line; log: {seen:?}"),
            }
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        send_signal(self.pid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The command for the binary, without `GREENLIGHT_WORKERS` in its environment.
fn command_without_workers_env() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greenlight"));
    command.env_remove("GREENLIGHT_WORKERS");
    command
}

#[test]
fn a_bad_worker_count_exits_2_at_once_naming_the_flag() {
    let flags: &[&[&str]] = &[
        &["--workers", "0"],
        &["--workers", "1025"],
        &["--workers", "4096"],
        &["--workers", "four"],
        &["--workers", ""],
        &["--workers", "4.0"],
        &["--workers", "2k"],
        &["--workers", "auto4"],
        &["--workers", "+4"],
        &["--workers", " 4"],
        &["--workers=-1"],
        &["--workers", "-1"],
    ];
    for args in flags {
        let output = run_to_exit(args, &[]);
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains("--workers"), "{args:?}: {text}");
    }
    for value in ["0", "1025", "many"] {
        let env = [("GREENLIGHT_WORKERS", value)];
        let output = run_to_exit(&[], &env);
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?}: {text}");
        assert!(text.contains("--workers"), "{env:?}: {text}");
    }
}

#[test]
fn a_worker_count_of_1024_is_the_largest_accepted() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greenlight"));
    command.args(["--workers", "1024"]);
    // Each worker holds descriptors of its own (an epoll, a waker): lift the soft descriptor
    // limit to the hard one so that the count is what is tested, not the machine's soft limit.
    // SAFETY: getrlimit and setrlimit are async-signal-safe; the closure touches nothing else.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (bare, started) = Bare::start(command);
    assert_eq!(started["workers"], 1024, "{started}");
    assert_eq!(worker_threads(bare.pid), worker_names(1024));
}

#[test]
fn workers_default_to_the_available_parallelism() {
    let expected = available_parallelism();
    let (bare, started) = Bare::start(command_without_workers_env());
    assert_eq!(started["workers"], expected, "{started}");
    assert_eq!(worker_threads(bare.pid), worker_names(expected as usize));
    drop(bare);

    let mut command = command_without_workers_env();
    command.args(["--workers", "auto"]);
    let (bare, started) = Bare::start(command);
    assert_eq!(started["workers"], expected, "{started}");
    assert_eq!(worker_threads(bare.pid), worker_names(expected as usize));
}

/// `auto` follows the CPUs the process may run on, not a count fixed at build time or the
/// machine's total: pinned to one CPU, it runs one worker. (On a one-CPU machine this cannot
/// tell the difference, and passes.)
#[test]
fn auto_counts_only_the_cpus_the_process_may_run_on() {
    // SAFETY: plain C structs and calls on this thread's own mask.
    let one_cpu = unsafe {
        let mut mine: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut mine),
            0
        );
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &mine))
            .expect("this thread may run on some CPU");
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut one);
        libc::CPU_SET(first, &mut one);
        one
    };
    let mut command = command_without_workers_env();
    // SAFETY: sched_setaffinity is a plain system call on the child's own (only) thread.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one_cpu) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let (bare, started) = Bare::start(command);
    assert_eq!(started["workers"], 1, "{started}");
    assert_eq!(worker_threads(bare.pid), worker_names(1));
}

#[test]
fn the_environment_sets_the_worker_count_and_a_flag_wins_over_it() {
    let mut server = spawn_server_with_env(&[], &[("GREENLIGHT_WORKERS", "3")]);
    assert_eq!(started_workers(&mut server), Some(3));
    assert_eq!(worker_threads(server.pid), worker_names(3));

    let mut server = spawn_server_with_env(&["--workers", "2"], &[("GREENLIGHT_WORKERS", "3")]);
    assert_eq!(started_workers(&mut server), Some(2));
    assert_eq!(worker_threads(server.pid), worker_names(2));

    // The flag wins even over a value that would be refused on its own.
    let mut server = spawn_server_with_env(&["--workers", "2"], &[("GREENLIGHT_WORKERS", "0")]);
    assert_eq!(started_workers(&mut server), Some(2));
    assert_eq!(exchange(&server, HEALTHCHECK).status, 200);
}

#[test]
fn worker_threads_are_named_worker_0_to_worker_n_minus_1() {
    for n in [4, 5] {
        let mut server = spawn_server(&["--workers", &n.to_string()]);
        assert_eq!(started_workers(&mut server), Some(n as u64));
        assert_eq!(worker_threads(server.pid), worker_names(n));
    }
}

#[test]
fn one_worker_runs_exactly_one_loop_that_holds_every_connection() {
    let mut server = spawn_server(&["--workers", "1"]);
    assert_eq!(started_workers(&mut server), Some(1));
    assert_eq!(worker_threads(server.pid), worker_names(1));
    let streams: Vec<TcpStream> = (0..8).map(|_| adopted_connection(&server)).collect();
    let peers: Vec<String> = streams.iter().map(peer_of).collect();
    let table = quit_and_read_table(&mut server, &peers);
    assert_eq!(table, vec![Some(0); peers.len()], "every row in worker 0");
}

#[test]
fn connections_are_dealt_to_the_workers_in_turn() {
    let mut server = spawn_server(&["--workers", "4", "--log-level", "debug"]);
    // One after another, each answered before the next connects: accepted in this order.
    let streams: Vec<TcpStream> = (0..12).map(|_| adopted_connection(&server)).collect();
    let peers: Vec<String> = streams.iter().map(peer_of).collect();
    let workers = workers_of(&mut server, &peers);
    let first = workers[0];
    let expected: Vec<u64> = (0..12).map(|i| (first + i) % 4).collect();
    assert_eq!(workers, expected, "round-robin over 4 workers");
}

#[test]
fn with_256_connections_open_no_worker_holds_less_than_half_its_share() {
    const CONNECTIONS: usize = 256;
    const WORKERS: u64 = 4;
    let mut server = spawn_server(&["--workers", "4"]);
    let streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| adopted_connection(&server))
        .collect();
    let peers: Vec<String> = streams.iter().map(peer_of).collect();
    let table = quit_and_read_table(&mut server, &peers);
    let missing = table.iter().filter(|worker| worker.is_none()).count();
    assert_eq!(missing, 0, "every open connection has a row");
    let mut held: BTreeMap<u64, usize> = (0..WORKERS).map(|worker| (worker, 0)).collect();
    for worker in table.into_iter().flatten() {
        assert!(worker < WORKERS, "worker index {worker} out of range");
        *held.entry(worker).or_default() += 1;
    }
    let half_share = CONNECTIONS / WORKERS as usize / 2;
    assert!(
        held.values().all(|&n| n >= half_share),
        "each worker holds at least {half_share}: {held:?}"
    );
}

/// Slow requests in flight on every worker, and one half-written request that holds its
/// worker's drain open after every other worker has finished: one `shutting down server`, one
/// `stopped server`, and that only once the very last connection has closed.
#[test]
fn one_sigterm_drains_every_worker_once_and_stopped_server_follows_the_last_close() {
    let mut server = spawn_server(&[
        "--workers",
        "4",
        "--healthcheck-delay",
        "1s",
        "--log-level",
        "debug",
    ]);
    let mut slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut stream = server.connect();
            stream.write_all(HEALTHCHECK).unwrap();
            stream
        })
        .collect();
    let mut held = server.connect();
    held.write_all(HALF_REQUEST).unwrap();
    let slow_peers: Vec<String> = slow.iter().map(peer_of).collect();
    let workers: BTreeSet<u64> = workers_of(&mut server, &slow_peers).into_iter().collect();
    assert_eq!(
        workers,
        BTreeSet::from([0, 1, 2, 3]),
        "in flight on every worker"
    );
    workers_of(&mut server, &[peer_of(&held)]);

    server.terminate();
    for stream in &mut slow {
        let response = read_response(stream);
        assert_eq!(response.status, 200);
        assert!(
            response.closes(),
            "the last response says close: {response:?}"
        );
        assert!(read_to_close(stream).unwrap().is_empty());
    }
    // Every other connection has closed; the half request still holds one worker's drain.
    assert!(
        server.still_running_after(Duration::from_millis(300)),
        "the process waits for its last connection"
    );
    assert_eq!(count(server.log(Duration::ZERO), "stopped server"), 0);

    held.write_all(REST_OF_REQUEST).unwrap();
    let response = read_response(&mut held);
    assert_eq!(response.status, 200);
    assert!(response.closes(), "{response:?}");
    assert!(read_to_close(&mut held).unwrap().is_empty());
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));

    let log = server.final_log();
    assert_eq!(count(log, "shutting down server"), 1, "{log:?}");
    assert_eq!(count(log, "stopped server"), 1, "{log:?}");
    let stopped_at = log
        .iter()
        .position(|line| line["msg"] == "stopped server")
        .unwrap();
    let mut all_peers = slow_peers;
    all_peers.push(peer_of(&held));
    for peer in &all_peers {
        let closes: Vec<usize> = log
            .iter()
            .enumerate()
            .filter(|(_, line)| line["msg"] == "closed" && line["peer"] == peer.as_str())
            .map(|(at, _)| at)
            .collect();
        assert_eq!(closes.len(), 1, "{peer} closed once: {log:?}");
        assert!(
            closes[0] < stopped_at,
            "stopped server comes after {peer} closed: {log:?}"
        );
    }
}

#[test]
fn sigint_starts_the_one_drain_too() {
    let mut server = spawn_server(&[
        "--workers",
        "4",
        "--healthcheck-delay",
        "500ms",
        "--log-level",
        "debug",
    ]);
    let mut streams: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = server.connect();
            stream.write_all(HEALTHCHECK).unwrap();
            stream
        })
        .collect();
    let peers: Vec<String> = streams.iter().map(peer_of).collect();
    let workers: BTreeSet<u64> = workers_of(&mut server, &peers).into_iter().collect();
    assert_eq!(workers.len(), 4, "one on each worker");
    server.signal(libc::SIGINT);
    let shutting = server
        .wait_for_log("shutting down server", PROMPTLY)
        .unwrap();
    assert_eq!(shutting["signal"], "SIGINT");
    for stream in &mut streams {
        let response = read_response(stream);
        assert_eq!(response.status, 200);
        assert!(response.closes(), "{response:?}");
    }
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    let log = server.final_log();
    assert_eq!(count(log, "shutting down server"), 1, "{log:?}");
    assert_eq!(count(log, "stopped server"), 1, "{log:?}");
}

/// Eight healthchecks in flight (a long `--healthcheck-delay`), two on each of 4 workers
/// (checked from the `accepted` debug lines).
fn in_flight_on_every_worker(server: &mut Server) -> Vec<TcpStream> {
    let streams: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut stream = server.connect();
            stream.write_all(HEALTHCHECK).unwrap();
            stream
        })
        .collect();
    let peers: Vec<String> = streams.iter().map(peer_of).collect();
    let workers: BTreeSet<u64> = workers_of(server, &peers).into_iter().collect();
    assert_eq!(
        workers,
        BTreeSet::from([0, 1, 2, 3]),
        "in flight on every worker"
    );
    streams
}

#[test]
fn the_one_shutdown_deadline_forces_every_worker_and_exits_1_within_seconds() {
    let mut server = spawn_server(&[
        "--workers",
        "4",
        "--healthcheck-delay",
        "30s",
        "--shutdown-timeout",
        "500ms",
        "--log-level",
        "debug",
    ]);
    let mut streams = in_flight_on_every_worker(&mut server);

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(1));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "not before the deadline: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "within seconds: {took:?}");
    assert_forced_exit_logged(&mut server, &mut streams);
}

#[test]
fn a_second_sigterm_while_draining_exits_1_with_an_error_line() {
    let mut server = spawn_server(&[
        "--workers",
        "4",
        "--healthcheck-delay",
        "30s",
        "--log-level",
        "debug",
    ]);
    let mut streams = in_flight_on_every_worker(&mut server);

    server.terminate();
    let second = Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(1));
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "at once: {:?}",
        second.elapsed()
    );
    assert_forced_exit_logged(&mut server, &mut streams);
}

/// Many attempts per count: were any worker still listening (a socket of its own, say), some
/// attempt would reach it.
#[test]
fn new_connections_are_refused_once_shutting_down_is_logged_whatever_the_worker_count() {
    let runs: Vec<_> = [1, 2, 4, 8]
        .into_iter()
        .map(|workers: usize| {
            thread::spawn(move || {
                let mut server = spawn_server(&[
                    "--workers",
                    &workers.to_string(),
                    "--healthcheck-delay",
                    "3s",
                ]);
                let mut busy = server.connect();
                busy.write_all(HEALTHCHECK).unwrap();
                server.terminate();
                for attempt in 0..16 {
                    let refused = TcpStream::connect(server.addr);
                    assert_eq!(
                        refused.map_err(|e| e.kind()).err(),
                        Some(ErrorKind::ConnectionRefused),
                        "--workers {workers}, attempt {attempt}"
                    );
                }
                assert!(
                    server.wait_exit(Duration::ZERO).is_none(),
                    "--workers {workers}: refused while still draining"
                );
                assert_eq!(read_response(&mut busy).status, 200);
                assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
            })
        })
        .collect();
    for run in runs {
        run.join().unwrap();
    }
}

/// A burst of fresh connections, each with its request written, then SIGTERM at once: the
/// workers have not read most of those requests yet when their drain begins (some connections
/// may not even be dealt out yet). Each is answered all the same, none closed as idle.
#[test]
fn a_burst_of_requests_written_just_before_sigterm_is_answered_in_full() {
    let mut server = spawn_server(&["--workers", "4"]);
    let mut streams: Vec<TcpStream> = (0..128)
        .map(|_| {
            let mut stream = server.connect();
            stream.write_all(HEALTHCHECK).unwrap();
            stream
        })
        .collect();
    server.signal(libc::SIGTERM);
    for (at, stream) in streams.iter_mut().enumerate() {
        let response = read_response_from(stream, false).unwrap_or_else(|partial| {
            panic!(
                "connection {at} lost: {:?}",
                String::from_utf8_lossy(&partial)
            )
        });
        // Answered before or after the signal (it says close only if after): answered.
        assert_eq!(response.status, 200, "connection {at}");
    }
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
}

/// 40 clients hammer keep-alive connections dealt over 4 workers; SIGTERM lands mid-stream.
/// Every request written before the signal is answered, none is cut short, and the process
/// exits 0.
#[test]
fn forty_clients_hammering_four_workers_through_sigterm_lose_nothing() {
    let mut server = spawn_server(&["--workers", "4"]);
    assert_eq!(started_workers(&mut server), Some(4));
    let answered = hammer_through_sigterm(&server, 40);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(answered >= 40 * 10);
    let log = server.final_log();
    assert_eq!(count(log, "shutting down server"), 1, "{log:?}");
    assert_eq!(count(log, "stopped server"), 1, "{log:?}");
}

#[test]
fn sigquit_with_a_worker_stuck_gives_up_on_it_within_seconds_and_exits_2() {
    let mut server = spawn_server(&["--workers", "2"]);
    let tids = thread_ids(server.pid, "worker-1");
    let stuck = StoppedThread::stop(tids[0]);
    let signalled = Instant::now();
    server.signal(libc::SIGQUIT);
    // The supervisor stops waiting for the stuck worker after a second and names it.
    let warning = server
        .wait_for_log(
            "workers did not answer in time, exiting without them",
            PROMPTLY,
        )
        .expect("a WARNING naming them");
    assert_eq!(warning["workers"], "[1]");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    // The traced thread can finish exiting only once this test lets go of it.
    drop(stuck);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(2));
}

/// A forced exit's log: an ERROR line, one `shutting down server`, no `stopped server`; and
/// every request in flight left unanswered.
fn assert_forced_exit_logged(server: &mut Server, streams: &mut [TcpStream]) {
    let log = server.final_log();
    assert!(
        log.iter().any(|line| line["level"] == "ERROR"),
        "an ERROR line: {log:?}"
    );
    assert_eq!(count(log, "shutting down server"), 1, "{log:?}");
    assert_eq!(count(log, "stopped server"), 0, "{log:?}");
    for stream in streams {
        assert_unanswered(stream);
    }
}
