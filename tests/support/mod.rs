//! Helpers for black-box tests: spawn the real binary on 127.0.0.1 --port 0, read its JSON log,
//! talk raw TCP to it, send it real signals.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous bound for anything that should happen "at once" on a loaded, shared machine.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A running greenlight process.
pub struct Server {
    pub addr: SocketAddr,
    pub pid: i32,
    log_lines: Receiver<Value>,
    seen: Vec<Value>,
    exit: Receiver<ExitStatus>,
    exited: Option<ExitStatus>,
}

/// Spawns the binary with `--host 127.0.0.1 --port 0 --log-format json` plus `args` (which may
/// name another `--host`), and waits for its `starting server` line.
pub fn spawn_server(args: &[&str]) -> Server {
    spawn_server_with_env(args, &[])
}

/// As [`spawn_server`], with extra environment variables.
pub fn spawn_server_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
    spawn(args, env, None)
}

/// As [`spawn_server`], with the soft and hard `RLIMIT_NOFILE` set for the child alone.
pub fn spawn_server_with_fd_limits(args: &[&str], soft: u64, hard: u64) -> Server {
    spawn(args, &[], Some((soft, hard)))
}

/// Sets `RLIMIT_NOFILE` for the child `command` starts, alone.
pub fn limit_fds(command: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Sets a running process's `RLIMIT_NOFILE` (as `prlimit --nofile` does).
pub fn set_fd_limit(pid: i32, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads a valid rlimit value and writes nothing (old limit pointer null).
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// As [`spawn_server_from`], with the soft and hard `RLIMIT_NOFILE` set for the child alone.
pub fn spawn_server_with_fd_limits_from(binary: &std::path::Path, soft: u64, hard: u64) -> Server {
    spawn_binary(binary.as_os_str(), &[], &[], Some((soft, hard)))
}

/// As [`spawn_server_from`], with extra environment variables.
pub fn spawn_server_with_env_from(binary: &std::path::Path, env: &[(&str, &str)]) -> Server {
    spawn_binary(binary.as_os_str(), &[], env, None)
}

/// As [`spawn_server`], started from the executable at `binary` (a copy, for upgrade tests).
pub fn spawn_server_from(binary: &std::path::Path, args: &[&str]) -> Server {
    spawn_binary(binary.as_os_str(), args, &[], None)
}

fn spawn(args: &[&str], env: &[(&str, &str)], nofile: Option<(u64, u64)>) -> Server {
    spawn_binary(env!("CARGO_BIN_EXE_greenlight").as_ref(), args, env, nofile)
}

fn spawn_binary(
    binary: &std::ffi::OsStr,
    args: &[&str],
    env: &[(&str, &str)],
    nofile: Option<(u64, u64)>,
) -> Server {
    let mut command = Command::new(binary);
    if !args.contains(&"--host") {
        command.args(["--host", "127.0.0.1"]);
    }
    command
        .args(["--port", "0", "--log-format", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some((soft, hard)) = nofile {
        limit_fds(&mut command, soft, hard);
    }
    let mut child = spawn_retrying_busy(&mut command);
    let pid = child.id() as i32;
    let stderr = child.stderr.take().expect("stderr");
    let (line_tx, log_lines) = channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
            if line_tx.send(value).is_err() {
                break;
            }
        }
    });
    let (exit_tx, exit) = channel();
    thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = exit_tx.send(status);
        }
    });
    let mut server = Server {
        addr: "0.0.0.0:0".parse().unwrap(),
        pid,
        log_lines,
        seen: Vec::new(),
        exit,
        exited: None,
    };
    let started = server
        .wait_for_log("starting server", PROMPTLY)
        .unwrap_or_else(|| panic!("no starting server line; log: {:?}", server.seen));
    server.addr = started["addr"]
        .as_str()
        .expect("addr field")
        .parse()
        .expect("addr parses");
    server
}

/// Spawns `command`, retrying while the executable is "busy" (ETXTBSY): a binary this test
/// process just copied can be held open for writing, for a moment, by a child that another
/// test thread forked before it execs (the copy's descriptor is inherited until exec).
fn spawn_retrying_busy(command: &mut Command) -> std::process::Child {
    let end = Instant::now() + PROMPTLY;
    loop {
        match command.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < end => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("spawn greenlight: {e}"),
        }
    }
}

impl Server {
    /// Opens a TCP connection to the server.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(PROMPTLY)).unwrap();
        stream.set_write_timeout(Some(PROMPTLY)).unwrap();
        stream
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        send_signal(self.pid, signal);
    }

    /// Sends SIGTERM and waits for `shutting down server`: from then on the drain is under way
    /// and the listener is closed.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        self.wait_for_log("shutting down server", PROMPTLY)
            .expect("the drain begins");
    }

    /// Waits for a log line whose `msg` is `msg` (lines seen before count too).
    pub fn wait_for_log(&mut self, msg: &str, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        let mut checked = 0;
        loop {
            if let Some(found) = self.seen[checked..].iter().find(|v| v["msg"] == msg) {
                return Some(found.clone());
            }
            checked = self.seen.len();
            let left = end.checked_duration_since(Instant::now())?;
            match self.log_lines.recv_timeout(left) {
                Ok(value) => self.seen.push(value),
                Err(_) => return None,
            }
        }
    }

    /// Waits for the `n`th log line (from 1) whose `msg` is `msg` (lines seen before count too).
    pub fn wait_for_nth_log(&mut self, msg: &str, n: usize, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            let mut matching = self.seen.iter().filter(|v| v["msg"] == msg);
            if let Some(found) = matching.nth(n.saturating_sub(1)) {
                return Some(found.clone());
            }
            let left = end.checked_duration_since(Instant::now())?;
            match self.log_lines.recv_timeout(left) {
                Ok(value) => self.seen.push(value),
                Err(_) => return None,
            }
        }
    }

    /// Every log line read so far, plus whatever arrives within `wait`.
    pub fn log(&mut self, wait: Duration) -> &[Value] {
        let end = Instant::now() + wait;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.log_lines.recv_timeout(left) {
                Ok(value) => self.seen.push(value),
                Err(_) => break,
            }
        }
        &self.seen
    }

    /// All log lines once the process has exited (stderr is read to its end).
    pub fn final_log(&mut self) -> &[Value] {
        while let Ok(value) = self.log_lines.recv_timeout(PROMPTLY) {
            self.seen.push(value);
        }
        &self.seen
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            match self.exit.recv_timeout(timeout) {
                Ok(status) => self.exited = Some(status),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
            }
        }
        self.exited
    }

    /// The process has not exited within `wait`.
    pub fn still_running_after(&mut self, wait: Duration) -> bool {
        self.wait_exit(wait).is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() && self.exit.try_recv().is_err() {
            send_signal(self.pid, libc::SIGKILL);
        }
    }
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: i32, signal: i32) {
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `Connection: close` was sent.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Reads one response (head, then a Content-Length body unless `head_only`). Returns `Err`
/// with the bytes read so far if the connection ends first.
pub fn read_response_from(stream: &mut impl Read, head_only: bool) -> Result<Response, Vec<u8>> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            // A signal landed on this thread: not the end of the connection (a raw read is
            // not retried for us as read_exact would be).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(raw),
        }
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| raw.clone())?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if status == 100 {
        return Ok(response);
    }
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| raw.clone())?;
    if !head_only {
        let mut body = vec![0; length];
        let mut filled = 0;
        while filled < length {
            match stream.read(&mut body[filled..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => {
                    raw.extend_from_slice(&body[..filled]);
                    return Err(raw);
                }
                Ok(n) => filled += n,
            }
        }
        response.body = body;
    }
    Ok(response)
}

/// Reads one response, panicking if the connection ends first.
pub fn read_response(stream: &mut TcpStream) -> Response {
    read_response_from(stream, false).unwrap_or_else(|raw| {
        panic!(
            "connection ended mid-response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Sends `raw` on a new connection and reads one response.
pub fn exchange(server: &Server, raw: &[u8]) -> Response {
    let mut stream = server.connect();
    stream.write_all(raw).unwrap();
    read_response(&mut stream)
}

/// A GET of the healthcheck.
pub const HEALTHCHECK: &[u8] = b"GET /v1/healthcheck HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Seconds of CPU (user + system) the process has used so far.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after_name = stat.rsplit_once(')').expect("comm field").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Reads until EOF; `Ok(bytes)` when the peer closed cleanly, `Err` on reset or timeout.
pub fn read_to_close(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(rest)
}

/// The admin listener's address from the `starting server` line (`--admin-addr` given).
pub fn admin_addr(server: &mut Server) -> SocketAddr {
    let started = server
        .wait_for_log("starting server", PROMPTLY)
        .expect("starting server");
    started["admin_addr"]
        .as_str()
        .expect("admin_addr field")
        .parse()
        .expect("admin_addr parses")
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `GET` (or whatever `raw` says) on a new connection to `addr`.
pub fn request_to(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(PROMPTLY)).unwrap();
    stream.write_all(raw).unwrap();
    read_response(&mut stream)
}

/// `GET path` on a new connection to `addr`.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request_to(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

/// The thread ids of the process's threads named `name`.
pub fn thread_ids(pid: i32, name: &str) -> Vec<i32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let path = entry.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            ids.push(path.file_name().unwrap().to_str().unwrap().parse().unwrap());
        }
    }
    ids
}

/// One thread of another process held stopped (ptrace seize + interrupt stops that thread
/// alone, unlike SIGSTOP, which stops the whole process): a worker loop stuck as if in a busy
/// loop or a blocking call. Released on drop.
pub struct StoppedThread(i32);

impl StoppedThread {
    /// Stops thread `tid` and waits until it is stopped.
    pub fn stop(tid: i32) -> StoppedThread {
        // SAFETY: plain ptrace/waitpid calls on a thread of our own child.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, null, null),
                0,
                "ptrace seize: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: detaching resumes the thread we seized. If its process is exiting meanwhile,
        // the thread is dying, no longer stopped: detach fails, and the tracer (us) must reap
        // it before the process can finish exiting.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            if libc::ptrace(libc::PTRACE_DETACH, self.0, null, null) != 0 {
                let mut status = 0;
                libc::waitpid(self.0, &mut status, libc::__WALL);
            }
        }
    }
}

/// `clients` threads hammer keep-alive connections with healthchecks; once each has had ten
/// answered, SIGTERM is sent. Every request written before the signal must be answered in
/// full (none lost, none cut short); after it, a refused write or a clean close ends a client.
/// Returns the number of requests answered. Bounded: 5,000 requests and 60 s per client.
pub fn hammer_through_sigterm(server: &Server, clients: usize) -> usize {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    const MAX_REQUESTS: usize = 5_000;
    let addr = server.addr;
    let warmed = Arc::new(Barrier::new(clients + 1));
    let signalled = Arc::new(AtomicBool::new(false));
    let answered_total = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..clients {
        let warmed = warmed.clone();
        let signalled = signalled.clone();
        let answered_total = answered_total.clone();
        threads.push(thread::spawn(move || -> Result<(), String> {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            stream.set_read_timeout(Some(PROMPTLY)).unwrap();
            let mut warm = true;
            for i in 0..MAX_REQUESTS {
                if Instant::now() > deadline {
                    return Err("client ran out of time".into());
                }
                if warm && i == 10 {
                    warmed.wait();
                    warm = false;
                }
                // Written before the signal is sent => must be answered.
                let before_signal = !signalled.load(Ordering::SeqCst);
                if let Err(e) = stream.write_all(HEALTHCHECK) {
                    if before_signal {
                        return Err(format!("write failed before the signal: {e}"));
                    }
                    break;
                }
                match read_response_from(&mut stream, false) {
                    Ok(response) => {
                        if response.status != 200 || response.json()["status"] != "available" {
                            return Err(format!("bad response {response:?}"));
                        }
                        answered_total.fetch_add(1, Ordering::Relaxed);
                        if response.closes() {
                            break;
                        }
                    }
                    Err(partial) if partial.is_empty() && !before_signal => break,
                    Err(partial) => {
                        return Err(format!(
                            "request (before signal: {before_signal}) lost or truncated: {:?}",
                            String::from_utf8_lossy(&partial)
                        ));
                    }
                }
            }
            if warm {
                warmed.wait();
            }
            Ok(())
        }));
    }
    warmed.wait();
    // The flag is raised before kill(2): a request written after reading `false` was written
    // before the signal was sent.
    signalled.store(true, Ordering::SeqCst);
    server.signal(libc::SIGTERM);
    for thread in threads {
        thread.join().unwrap().unwrap();
    }
    answered_total.load(Ordering::Relaxed)
}
