//! Upgrade in place: SIGHUP starts the executable greenlight was started from, hands it every
//! listening socket, and the old process drains once the new one is ready; a new process that
//! fails or never becomes ready is reaped and the old one serves on.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// A process this test did not start (the upgrade's new one): stopped when the test ends.
struct Stranger(i32);

impl Stranger {
    fn is_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0)).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// Waits until `pid` is gone (not even a zombie), bounded.
fn gone_within(pid: i32, bound: Duration) -> bool {
    let end = Instant::now() + bound;
    while Instant::now() < end {
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A private copy of the binary in a fresh directory, so a test can replace it on disk.
fn binary_copy(tag: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("greenlight-upgrade-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("greenlight");
    std::fs::copy(env!("CARGO_BIN_EXE_greenlight"), &path).unwrap();
    (dir, path)
}

/// Replaces the executable at `path` with a shell script (a new file: the running process
/// keeps the old inode, as with `install` or `cp` to a temporary name and `mv`).
fn replace_with_script(path: &Path, body: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// Clients that keep requesting until told to stop: one on keep-alive connections (moving to
/// a new connection whenever a response says close), one with a new connection per request.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Result<(), String>>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for keep_alive in [true, false] {
            let (stop, answered) = (stop.clone(), answered.clone());
            threads.push(thread::spawn(move || -> Result<(), String> {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut stream: Option<TcpStream> = None;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let mut conn = match stream.take() {
                        Some(conn) => conn,
                        None => {
                            let conn =
                                TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
                            conn.set_read_timeout(Some(PROMPTLY)).unwrap();
                            conn
                        }
                    };
                    let request: &[u8] = if keep_alive {
                        HEALTHCHECK
                    } else {
                        b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    };
                    conn.write_all(request).map_err(|e| format!("write: {e}"))?;
                    let response = read_response_from(&mut conn, false)
                        .map_err(|raw| format!("cut short: {:?}", String::from_utf8_lossy(&raw)))?;
                    if response.status != 200 {
                        return Err(format!("status {}", response.status));
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    if keep_alive && !response.closes() {
                        stream = Some(conn);
                    }
                }
                Ok(())
            }));
        }
        Load {
            stop,
            answered,
            threads,
        }
    }

    /// Waits until `more` requests beyond those answered so far are answered.
    fn wait_for(&self, more: usize) {
        let target = self.answered.load(Ordering::SeqCst) + more;
        let end = Instant::now() + PROMPTLY;
        while self.answered.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < end, "the load stalled");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("a client failed: {e}"));
        }
        self.answered.load(Ordering::SeqCst)
    }
}

#[test]
fn an_upgrade_under_load_answers_every_request_and_the_old_process_exits_0() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut old = spawn_server(&["--admin-addr", &admin]);
    let admin = admin_addr(&mut old);
    let load = Load::start(old.addr);
    load.wait_for(200);

    old.signal(libc::SIGHUP);
    let handover = old
        .wait_for_log("shutting down server", PROMPTLY)
        .expect("the old process hands over");
    assert_eq!(handover["reason"], "upgrade", "{handover}");
    let new = Stranger(handover["new_pid"].as_i64().expect("new_pid") as i32);
    assert_ne!(new.0, old.pid);
    assert!(new.is_alive());
    assert_eq!(
        old.wait_exit(PROMPTLY).and_then(|s| s.code()),
        Some(0),
        "old exits 0"
    );

    // The new process serves the same sockets, the admin listener too.
    load.wait_for(200);
    assert_eq!(get(admin, "/readyz").status, 200);
    let answered = load.finish();
    assert!(answered >= 400);
    // Not final_log(): the new process shares stderr and keeps it open.
    let log = old.log(Duration::from_millis(100));
    assert_eq!(
        log.iter().filter(|l| l["msg"] == "starting server").count(),
        2,
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l["level"] == "ERROR"), "{log:?}");
}

#[test]
fn a_new_process_that_exits_at_start_up_is_reaped_and_the_old_one_serves_on() {
    let (dir, binary) = binary_copy("exits");
    let mut old = spawn_server_from(&binary, &[]);
    replace_with_script(&binary, "exit 1");
    let load = Load::start(old.addr);
    load.wait_for(50);
    old.signal(libc::SIGHUP);
    let started = old
        .wait_for_log("upgrading: started the new process", PROMPTLY)
        .expect("started");
    let failed = old
        .wait_for_log("upgrade failed", PROMPTLY)
        .expect("ERROR upgrade failed");
    assert_eq!(failed["level"], "ERROR");
    assert_eq!(failed["reason"], "exited with status 1", "{failed}");
    let child = started["pid"].as_i64().unwrap() as i32;
    assert!(
        gone_within(child, PROMPTLY),
        "the failed process was left a zombie"
    );
    load.wait_for(50);
    assert!(load.finish() >= 100, "served on throughout");
    assert!(old.still_running_after(Duration::from_millis(100)));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_new_process_never_ready_is_killed_at_the_upgrade_timeout() {
    let (dir, binary) = binary_copy("hangs");
    let mut old = spawn_server_from(&binary, &["--upgrade-timeout", "500ms"]);
    replace_with_script(&binary, "exec sleep 30");
    old.signal(libc::SIGHUP);
    let started = old
        .wait_for_log("upgrading: started the new process", PROMPTLY)
        .expect("started");
    // A second SIGHUP while it is under way is refused.
    old.signal(libc::SIGHUP);
    let refused = old
        .wait_for_log(
            "ignoring SIGHUP: an upgrade is already in progress",
            PROMPTLY,
        )
        .expect("WARNING");
    assert_eq!(refused["level"], "WARNING");
    let failed = old
        .wait_for_log("upgrade failed", PROMPTLY)
        .expect("ERROR upgrade failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("not ready within 500 ms"),
        "{failed}"
    );
    let child = started["pid"].as_i64().unwrap() as i32;
    assert!(
        gone_within(child, PROMPTLY),
        "the killed process was left a zombie"
    );
    assert_eq!(exchange(&old, HEALTHCHECK).status, 200);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sighup_during_a_drain_is_ignored_with_a_warning() {
    let mut server = spawn_server(&["--healthcheck-delay", "1s"]);
    let mut slow = server.connect();
    slow.write_all(HEALTHCHECK).unwrap();
    assert_eq!(
        exchange(&server, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").status,
        404
    );
    server.terminate();
    server.signal(libc::SIGHUP);
    let warning = server
        .wait_for_log(
            "ignoring SIGHUP: the process is stopping or handing over",
            PROMPTLY,
        )
        .expect("WARNING");
    assert_eq!(warning["level"], "WARNING");
    assert_eq!(read_response(&mut slow).status, 200);
    assert_eq!(server.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(
        !server
            .final_log()
            .iter()
            .any(|l| l["msg"] == "upgrading: started the new process")
    );
}

#[test]
fn the_new_process_gets_the_original_soft_descriptor_limit() {
    let (dir, binary) = binary_copy("limit");
    let mut old = spawn_server_with_fd_limits_from(&binary, 64, 4096);
    let started = old.wait_for_log("starting server", PROMPTLY).unwrap();
    assert_eq!(started["max_fds"], 4096, "the old one raised its own");
    let report = dir.join("soft-limit");
    replace_with_script(
        &binary,
        &format!("ulimit -Sn > {}; exit 1", report.display()),
    );
    old.signal(libc::SIGHUP);
    old.wait_for_log("upgrade failed", PROMPTLY)
        .expect("the script exits 1");
    assert_eq!(std::fs::read_to_string(&report).unwrap().trim(), "64");
    std::fs::remove_dir_all(dir).ok();
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
fn notify_socket(tag: &str) -> (std::os::unix::net::UnixDatagram, PathBuf) {
    let dir = std::env::temp_dir().join(format!("greenlight-notify-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(PROMPTLY)).unwrap();
    (socket, path)
}

fn next_notice(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
}

#[test]
fn under_systemd_the_new_process_is_not_our_child_when_mainpid_names_it() {
    let (socket, path) = notify_socket("mainpid");
    let mut old = spawn_server_with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    assert!(next_notice(&socket).starts_with("READY=1\n"));
    old.signal(libc::SIGHUP);
    assert!(next_notice(&socket).starts_with("RELOADING=1\n"));
    let mut notices = Vec::new();
    let main_pid = loop {
        let notice = next_notice(&socket);
        if let Some(pid) = notice.strip_prefix("MAINPID=") {
            break pid.trim().parse::<i32>().unwrap();
        }
        notices.push(notice);
    };
    assert!(
        notices.iter().any(|n| n.starts_with("READY=1\n")),
        "the new process said READY=1 first: {notices:?}"
    );
    let new = Stranger(main_pid);
    assert_ne!(main_pid, old.pid);
    // systemd 252 SIGKILLs at `stop` a main process that was not its child at MAINPID=: the
    // new process must already have left the old one by then.
    assert_ne!(
        parent_of(main_pid),
        Some(old.pid),
        "still the old process's child"
    );
    let handover = old.wait_for_log("shutting down server", PROMPTLY).unwrap();
    assert_eq!(handover["new_pid"], main_pid);
    assert_eq!(old.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert_eq!(
        exchange(&old, HEALTHCHECK).status,
        200,
        "the new one serves"
    );
    assert!(new.is_alive());
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

#[test]
fn under_systemd_a_new_process_that_cannot_start_says_its_status() {
    let (socket, path) = notify_socket("fails");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (dir, binary) = binary_copy("detached-fails");
    let mut old = spawn_server_with_env_from(&binary, &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    assert!(next_notice(&socket).starts_with("READY=1\n"));
    // The new binary is greenlight all right, but its admin address is taken: it exits 1.
    let real = dir.join("greenlight.real");
    std::fs::copy(env!("CARGO_BIN_EXE_greenlight"), &real).unwrap();
    let taken_addr = taken.local_addr().unwrap();
    replace_with_script(
        &binary,
        &format!("exec {} \"$@\" --admin-addr {taken_addr}", real.display()),
    );
    old.signal(libc::SIGHUP);
    let failed = old
        .wait_for_log("upgrade failed", PROMPTLY)
        .expect("ERROR upgrade failed");
    assert_eq!(failed["reason"], "exited with status 1", "{failed}");
    // systemd hears the service is ready again.
    assert!(next_notice(&socket).starts_with("RELOADING=1\n"));
    assert!(next_notice(&socket).starts_with("READY=1\n"));
    assert_eq!(exchange(&old, HEALTHCHECK).status, 200, "serves on");
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

#[test]
fn sigterm_while_the_new_process_starts_stops_it_too() {
    stop_while_the_new_process_starts("abandoned", libc::SIGTERM, 0);
}

#[test]
fn sigquit_while_the_new_process_starts_takes_it_along() {
    stop_while_the_new_process_starts("quit", libc::SIGQUIT, 2);
}

/// Starts an upgrade to a new process that never becomes ready, sends `signal`, and checks
/// the old process exits with `code` and has reaped the new one first: not left running, nor
/// a zombie for init.
fn stop_while_the_new_process_starts(tag: &str, signal: i32, code: i32) {
    let (dir, binary) = binary_copy(tag);
    let mut old = spawn_server_from(&binary, &[]);
    replace_with_script(&binary, "exec sleep 30");
    old.signal(libc::SIGHUP);
    let started = old
        .wait_for_log("upgrading: started the new process", PROMPTLY)
        .expect("started");
    let child = started["pid"].as_i64().unwrap() as i32;
    old.signal(signal);
    assert_eq!(old.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(code));
    assert!(
        std::fs::metadata(format!("/proc/{child}")).is_err(),
        "a new process that never served outlived the old one"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_new_greenlight_that_fails_at_start_up_is_logged_once_with_its_status() {
    // The real binary, whose admin address is taken: it says EXIT 1 on the pipe, then exits 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (dir, binary) = binary_copy("fails-once");
    let mut old = spawn_server_from(&binary, &[]);
    let real = dir.join("greenlight.real");
    std::fs::copy(env!("CARGO_BIN_EXE_greenlight"), &real).unwrap();
    replace_with_script(
        &binary,
        &format!(
            "exec {} \"$@\" --admin-addr {}",
            real.display(),
            taken.local_addr().unwrap()
        ),
    );
    old.signal(libc::SIGHUP);
    let failed = old
        .wait_for_log("upgrade failed", PROMPTLY)
        .expect("ERROR upgrade failed");
    assert_eq!(failed["reason"], "exited with status 1", "{failed}");
    assert_eq!(exchange(&old, HEALTHCHECK).status, 200, "serves on");
    // The whole log, up to the exit (which waits for the failed process to be reaped).
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    let failures = old
        .log(Duration::ZERO)
        .iter()
        .filter(|line| line["msg"] == "upgrade failed")
        .count();
    assert_eq!(failures, 1, "{:#?}", old.log(Duration::ZERO));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_new_process_that_closes_its_pipe_but_stays_is_killed_at_the_upgrade_timeout() {
    let (dir, binary) = binary_copy("lingers");
    let mut old = spawn_server_from(&binary, &["--upgrade-timeout", "500ms"]);
    replace_with_script(
        &binary,
        "eval \"exec $GREENLIGHT_READY_FD>&-\"\nexec sleep 30",
    );
    old.signal(libc::SIGHUP);
    let started = old
        .wait_for_log("upgrading: started the new process", PROMPTLY)
        .expect("started");
    let child = started["pid"].as_i64().unwrap() as i32;
    let failed = old
        .wait_for_log("upgrade failed", PROMPTLY)
        .expect("ERROR upgrade failed");
    assert!(
        failed["reason"].as_str().unwrap().ends_with("killed it"),
        "{failed}"
    );
    assert!(gone_within(child, PROMPTLY), "still running");
    // Settled: the next SIGHUP starts a new upgrade rather than being refused.
    old.signal(libc::SIGHUP);
    old.wait_for_nth_log("upgrading: started the new process", 2, PROMPTLY)
        .expect("a later upgrade starts");
    assert_eq!(exchange(&old, HEALTHCHECK).status, 200, "serves on");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sigterm_during_the_grace_stops_the_old_process_and_leaves_the_new_one_serving() {
    let mut old = spawn_server(&[]);
    old.signal(libc::SIGHUP);
    let handover = old
        .wait_for_log("shutting down server", PROMPTLY)
        .expect("handed over");
    let new = Stranger(handover["new_pid"].as_i64().unwrap() as i32);
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait_exit(PROMPTLY).and_then(|s| s.code()), Some(0));
    assert!(new.is_alive());
    assert_eq!(
        exchange(&old, HEALTHCHECK).status,
        200,
        "the new one serves"
    );
}
