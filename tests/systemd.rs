//! The systemd protocols from outside, without systemd: a notify socket of our own, the
//! watchdog variables, and a listening socket handed over as fd 3 (LISTEN_FDS/LISTEN_PID).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A notify socket in a fresh temporary directory.
fn notify_socket() -> (UnixDatagram, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "greenlight-notify-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(PROMPTLY)).unwrap();
    (socket, path.to_string_lossy().into_owned(), dir)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notify_socket_hears_ready_then_stopping_with_draining_status_then_stopped() {
    let (socket, path, dir) = notify_socket();
    let mut server = spawn_server_with_env(
        &["--healthcheck-delay", "500ms"],
        &[("NOTIFY_SOCKET", &path)],
    );
    let ready = next_message(&socket);
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=serving on {}\n", server.addr)
    );

    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    server.signal(libc::SIGTERM);
    assert_eq!(
        next_message(&socket),
        "STOPPING=1\nSTATUS=draining 1 connection\n"
    );
    assert_eq!(read_response(&mut stream).status, 200);
    assert_eq!(next_message(&socket), "STATUS=stopped\n");
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn watchdog_is_pinged_at_half_the_interval_from_the_loop() {
    let (socket, path, dir) = notify_socket();
    let _server = spawn_server_with_env(
        &[],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );
    assert!(next_message(&socket).starts_with("READY=1\n"));
    let mut pings = Vec::new();
    while pings.len() < 4 {
        if next_message(&socket) == "WATCHDOG=1\n" {
            pings.push(Instant::now());
        }
    }
    let spans: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    for span in &spans {
        assert!(
            *span >= Duration::from_millis(150) && *span < Duration::from_secs(1),
            "pings every ~200 ms (half of 400 ms), saw {spans:?}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn watchdog_for_another_pid_is_ignored() {
    let (socket, path, dir) = notify_socket();
    let _server = spawn_server_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", &path),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    assert!(next_message(&socket).starts_with("READY=1\n"));
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        socket.recv(&mut buf).is_err(),
        "no WATCHDOG=1 for a watchdog meant for pid 1"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn socket_activation_serves_the_inherited_socket_and_ignores_host_and_port() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" --host 127.0.0.1 --port 1 --log-format json"#)
        .arg(env!("CARGO_BIN_EXE_greenlight"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe; fd 3 is where sd_listen_fds(3) starts.
    // When the listener already is fd 3, dup2 is a no-op that would leave it close-on-exec.
    unsafe {
        command.pre_exec(move || {
            let result = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if result < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = KilledOnDrop(command.spawn().unwrap());
    drop(listener);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let started = loop {
        let text = lines.next().expect("a log line").unwrap();
        let line: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        log.push(line.clone());
        if line["msg"] == "starting server" {
            break line;
        }
    };
    assert_eq!(
        started["addr"],
        addr.to_string(),
        "serves the inherited socket, not --port 1"
    );
    assert!(log.iter().any(|l| l["msg"]
        == "using the listening socket passed by systemd; --host and --port are ignored"));

    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PROMPTLY)).unwrap();
    stream.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut stream).status, 200);
    send_signal(child.0.id() as i32, libc::SIGTERM);
    drop(stream);
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

#[test]
fn listen_fds_naming_a_closed_descriptor_fails_to_start_cleanly() {
    let output = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3>&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" --log-format json"#)
        .arg(env!("CARGO_BIN_EXE_greenlight"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "a clear start-up failure, not an abort"
    );
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("cannot start server") && text.contains("LISTEN_FDS"),
        "{text}"
    );
}

#[test]
fn the_watchdog_is_not_fed_while_a_worker_loop_is_stuck() {
    let (socket, path, dir) = notify_socket();
    let server = spawn_server_with_env(
        &["--workers", "2"],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );
    assert!(next_message(&socket).starts_with("READY=1\n"));
    assert_eq!(next_message(&socket), "WATCHDOG=1\n");
    let tids = support::thread_ids(server.pid, "worker-1");
    let stuck = support::StoppedThread::stop(tids[0]);
    // Pings may go on until the stuck worker's last heartbeat is a second old; after that none
    // for as long as it stays stuck.
    let stuck_at = Instant::now();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut last_ping = stuck_at;
    while stuck_at.elapsed() < Duration::from_millis(3000) {
        if let Ok(n) = socket.recv(&mut buf)
            && &buf[..n] == b"WATCHDOG=1\n"
        {
            last_ping = Instant::now();
        }
    }
    assert!(
        last_ping - stuck_at < Duration::from_millis(1600),
        "WATCHDOG=1 went on {:?} after a worker got stuck",
        last_ping - stuck_at
    );
    drop(stuck);
    socket.set_read_timeout(Some(PROMPTLY)).unwrap();
    while next_message(&socket) != "WATCHDOG=1\n" {}
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn socket_activation_tells_the_api_and_admin_sockets_apart_by_name() {
    // Passed in the "wrong" order on purpose: names decide, not positions.
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let (admin_addr, api_addr) = (admin.local_addr().unwrap(), api.local_addr().unwrap());
    let (admin_fd, api_fd) = (admin.as_raw_fd(), api.as_raw_fd());
    // A request on each socket before greenlight runs (as when a connection starts the
    // service): queued in the sockets, both must be answered once it is up.
    let early = |addr, raw: &[u8]| {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PROMPTLY)).unwrap();
        stream.write_all(raw).unwrap();
        stream
    };
    let mut early_admin = early(admin_addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut early_api = early(api_addr, HEALTHCHECK);
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=admin:api exec "$0" --log-format json"#)
        .arg(env!("CARGO_BIN_EXE_greenlight"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe. Move both out of the way first, then to 3 and 4
    // (dup2 clears close-on-exec on the copy).
    unsafe {
        command.pre_exec(move || {
            let (a, b) = (libc::dup(admin_fd), libc::dup(api_fd));
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(a);
            libc::close(b);
            Ok(())
        });
    }
    let mut child = KilledOnDrop(command.spawn().unwrap());
    drop((admin, api));
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let started = loop {
        let text = lines.next().expect("a log line").unwrap();
        let line: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        if line["msg"] == "starting server" {
            break line;
        }
    };
    assert_eq!(started["addr"], api_addr.to_string(), "{started}");
    assert_eq!(started["admin_addr"], admin_addr.to_string(), "{started}");
    assert_eq!(
        read_response(&mut early_admin).status,
        200,
        "queued admin request"
    );
    assert_eq!(
        read_response(&mut early_api).status,
        200,
        "queued API request"
    );
    assert_eq!(get(admin_addr, "/readyz").status, 200);
    assert_eq!(get(api_addr, "/v1/healthcheck").status, 200);
    send_signal(child.0.id() as i32, libc::SIGTERM);
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

/// A greenlight started by hand: killed if the test fails before it exits, so no process
/// outlives the test (holding its output pipe open).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
