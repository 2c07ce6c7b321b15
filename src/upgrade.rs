//! Upgrade in place, the process side: start the executable greenlight was started from, handing
//! it every listening socket through the `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` protocol and
//! a pipe to say it is ready on; and, in the new process, say so.
//!
//! Written by hand: `shellflip` and `ecdysis` (Cloudflare's graceful-restart crates) both run on
//! tokio, which greenlight does not use, and shellflip does not hand listening sockets over.

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable naming the descriptor a new process writes [`READY`] to.
pub const READY_FD_VAR: &str = "GREENLIGHT_READY_FD";

/// Set for a new process whose sockets were the old process's own (bound by it, not passed by
/// systemd): it then takes their queues at its drain, as the only holder left.
pub const SOCKETS_OWNED_VAR: &str = "GREENLIGHT_SOCKETS_OWNED";

/// What a new process writes when it serves (the moment of its `starting server` line).
/// The pipe carries lines: `PID n` (from the intermediate process of a detached start: the new
/// process's PID), `READY`, or `EXIT n` (the new process is exiting with status n before it
/// was ready).
pub const READY: &[u8] = b"READY\n";

/// How long the old process keeps answering, every response with `Connection: close`, once the
/// new one is ready, before its drain: busy keep-alive clients move over on their next request
/// instead of meeting a close (about 6 % of plain keep-alive hand-overs lost a request when idle
/// connections were closed at once).
pub const UPGRADE_GRACE: Duration = Duration::from_secs(1);

/// Variables the old process sets anew for the new one (never passed on from its own
/// environment): the socket-passing protocol, the readiness pipe, and systemd's watchdog PID
/// (absent, the new process feeds `WATCHDOG_USEC` itself once it is the main process).
const NOT_PASSED_ON: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    READY_FD_VAR,
    SOCKETS_OWNED_VAR,
];

/// The executable greenlight was started from, resolved now, at start-up: `argv[0]` made
/// absolute (or looked up in `PATH`). Not `/proc/self/exe`: once the binary is replaced on disk
/// that names the old file, and the upgrade would start the old program again.
pub fn executable_at_startup() -> Option<PathBuf> {
    let arg0 = PathBuf::from(std::env::args_os().next()?);
    if arg0.as_os_str().as_bytes().contains(&b'/') {
        return Some(std::env::current_dir().ok()?.join(arg0));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(&arg0))
        .find(|candidate| candidate.is_file())
}

/// A socket to hand over, and its `LISTEN_FDNAMES` name (`api`, `admin`).
pub struct Handed<'a> {
    /// The listening socket's descriptor.
    pub fd: RawFd,
    /// Its name.
    pub name: &'a str,
}

/// A started new process: its PID and the read end of its readiness pipe.
pub struct Started {
    /// The new process.
    pub pid: libc::pid_t,
    /// Readable when it is ready ([`READY`]) or gone (end of file).
    pub ready: OwnedFd,
}

/// Starts `exe` with `args` and this process's environment (less the socket-passing, readiness
/// and watchdog-PID variables, which it sets anew), handing it `sockets` at descriptors 3.. and
/// the write end of a readiness pipe after them, with the soft descriptor limit set back to
/// `original_soft` so it raises it itself as this one did.
///
/// `detach` (under systemd): start it through an intermediate process that exits at once, so
/// the new process is the service manager's child, not ours, by the time `MAINPID=` names it.
/// systemd 252 decides once, at `MAINPID=`, whether the main process is its child; one that is
/// not is SIGKILLed at the next `systemctl stop` instead of being given its graceful stop.
/// The intermediate then writes `PID n` on the pipe, and [`Started::pid`] is the
/// intermediate's (reaped at once); the new process's exit status is then only what it says on
/// the pipe (`EXIT n`), since only its parent could wait for it.
pub fn spawn(
    exe: &Path,
    args: &[OsString],
    sockets: &[Handed<'_>],
    sockets_owned: bool,
    original_soft: u64,
    detach: bool,
) -> io::Result<Started> {
    let (ready_read, ready_write) = pipe()?;
    let ready_target = 3 + sockets.len() as RawFd;

    // Everything the child needs is built now: between fork and exec it may only make
    // async-signal-safe calls (no allocation: another thread may hold the allocator's lock).
    let path = cstring(exe.as_os_str())?;
    let mut argv = vec![path.clone()];
    for arg in args {
        argv.push(cstring(arg)?);
    }
    let names: Vec<&str> = sockets.iter().map(|s| s.name).collect();
    let mut env: Vec<CString> = Vec::new();
    for (key, value) in std::env::vars_os() {
        if NOT_PASSED_ON.iter().any(|k| OsStr::new(k) == key) {
            continue;
        }
        let mut entry = key.into_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env.push(CString::new(entry).map_err(invalid)?);
    }
    env.push(cstr(&format!("LISTEN_FDS={}", sockets.len()))?);
    env.push(cstr(&format!("LISTEN_FDNAMES={}", names.join(":")))?);
    env.push(cstr(&format!("{READY_FD_VAR}={ready_target}"))?);
    if sockets_owned {
        env.push(cstr(&format!("{SOCKETS_OWNED_VAR}=1"))?);
    }
    // Room for ten digits and a NUL, filled in by the child with its own PID (which the parent
    // cannot know).
    let mut pid_entry: Vec<u8> = b"LISTEN_PID=0000000000\0".to_vec();
    let pid_digits_at = "LISTEN_PID=".len();

    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let pid_digits = pid_entry.as_mut_ptr();
    let env_ptrs: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([pid_digits as *const libc::c_char, std::ptr::null()])
        .collect();
    let sources: Vec<RawFd> = sockets
        .iter()
        .map(|s| s.fd)
        .chain(std::iter::once(ready_write.as_raw_fd()))
        .collect();
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit value it is given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) };
    let limit = libc::rlimit {
        rlim_cur: original_soft.min(current.rlim_max),
        rlim_max: current.rlim_max,
    };

    // Every signal is blocked across the fork: a signal sent to the child before it has reset
    // its handlers (the same SIGTERM that abandons it, say) would otherwise run this
    // process's handler in the child, which writes to this process's signal pipe and leaves
    // the child running. Blocked, it waits until the child has restored the defaults.
    let mut blocked_before = empty_sigset();
    let mut all = empty_sigset();
    // SAFETY: sigfillset and pthread_sigmask read and write the valid sets they are given.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut blocked_before);
    }
    // SAFETY: fork duplicates the calling thread only; the child below calls nothing but
    // async-signal-safe functions (sigaction, sigprocmask, fcntl, dup2, setrlimit, getpid,
    // execve, _exit) on memory prepared above, then replaces itself or exits.
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        // SAFETY: as above; the parent's mask as it was.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &blocked_before, std::ptr::null_mut()) };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; every pointer refers to memory built before the fork.
        unsafe {
            child(
                &sources,
                &limit,
                pid_digits.add(pid_digits_at),
                &path,
                &argv_ptrs,
                &env_ptrs,
                detach,
            )
        }
    }
    drop(ready_write);
    drop(pid_entry);
    Ok(Started {
        pid,
        ready: ready_read,
    })
}

/// In the forked child: descriptors to 3.., the original limit, its PID into `LISTEN_PID`, exec.
///
/// # Safety
/// Only between fork and exec, with every pointer valid and built before the fork.
unsafe fn child(
    sources: &[RawFd],
    limit: &libc::rlimit,
    pid_digits: *mut u8,
    path: &CString,
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
    detach: bool,
) -> ! {
    unsafe {
        // Default dispositions (this process's handlers and its ignored SIGPIPE are not the new
        // program's), then nothing blocked: a signal that came since the fork is acted on now.
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..32 {
            // The standard signals; SIGKILL and SIGSTOP cannot be changed (sigaction fails for
            // them, harmlessly).
            libc::sigaction(signal, &default, std::ptr::null_mut());
        }
        let none = empty_sigset();
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // First out of the way (above every target), close-on-exec, so no dup2 below clobbers
        // a source not yet moved; then into place (dup2 clears close-on-exec on the copy).
        let above = 3 + sources.len() as RawFd + 1;
        let mut moved = [0 as RawFd; 16];
        for (slot, &fd) in moved.iter_mut().zip(sources) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above);
            if *slot < 0 {
                libc::_exit(126);
            }
        }
        for (target, &fd) in (3..).zip(moved.iter().take(sources.len())) {
            if libc::dup2(fd, target) < 0 {
                libc::_exit(126);
            }
        }
        // The readiness pipe is the last descriptor handed over.
        let pipe = 3 + sources.len() as RawFd - 1;
        if detach {
            let grandchild = libc::fork();
            if grandchild < 0 {
                libc::_exit(126);
            }
            if grandchild > 0 {
                say(pipe, b"PID ", grandchild as u32);
                libc::_exit(0);
            }
        }
        libc::setrlimit(libc::RLIMIT_NOFILE, limit);
        // The PID as people write it ("12187", never "0000012187": a shell compares
        // `$LISTEN_PID` with `$$` as strings), ended early by a NUL in the ten-digit slot.
        let mut digits = [0u8; 10];
        let mut count = 0;
        let mut pid = libc::getpid() as u32;
        while let Some(slot) = digits.get_mut(count) {
            *slot = b'0' + (pid % 10) as u8;
            count += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        for (i, &digit) in digits.iter().take(count).rev().enumerate() {
            *pid_digits.add(i) = digit;
        }
        *pid_digits.add(count) = 0;
        libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr());
        say(pipe, b"EXIT ", 127);
        libc::_exit(127)
    }
}

/// Writes `word` and `number` and a newline to `fd`, with no allocation (after fork).
///
/// # Safety
/// `fd` is any descriptor; write(2) is async-signal-safe.
unsafe fn say(fd: RawFd, word: &[u8], mut number: u32) {
    let mut line = [0u8; 24];
    let mut len = 0;
    for (slot, &byte) in line.iter_mut().zip(word) {
        *slot = byte;
        len += 1;
    }
    let mut digits = [0u8; 10];
    let mut count = 0;
    loop {
        if let Some(slot) = digits.get_mut(count) {
            *slot = b'0' + (number % 10) as u8;
        }
        count += 1;
        number /= 10;
        if number == 0 || count == digits.len() {
            break;
        }
    }
    for i in (0..count).rev() {
        if let (Some(slot), Some(&digit)) = (line.get_mut(len), digits.get(i)) {
            *slot = digit;
            len += 1;
        }
    }
    if let Some(slot) = line.get_mut(len) {
        *slot = b'\n';
        len += 1;
    }
    // SAFETY: the buffer is valid for `len` bytes.
    unsafe { libc::write(fd, line.as_ptr().cast(), len) };
}

/// The readiness pipe this process was handed by the process it upgrades, if any (named by
/// [`READY_FD_VAR`]); claimed early, like systemd's sockets.
pub fn inherited_ready_pipe() -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(READY_FD_VAR).ok()?.parse().ok()?;
    // Only a descriptor that is open: F_GETFD fails on anything else.
    // SAFETY: fcntl on a descriptor number is harmless whether or not it is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: the process that started us passed this descriptor for us alone.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The sockets were the old process's own, not systemd's ([`SOCKETS_OWNED_VAR`]).
pub fn inherited_sockets_owned() -> bool {
    std::env::var_os(SOCKETS_OWNED_VAR).is_some()
}

/// Says "ready" on the pipe and closes it.
pub fn announce_ready(pipe: OwnedFd) -> io::Result<()> {
    let mut file = std::fs::File::from(pipe);
    file.write_all(READY)
}

/// Says "exiting with `code`" on the pipe (a new process that could not start) and closes it.
pub fn announce_exit(pipe: OwnedFd, code: u8) {
    let mut file = std::fs::File::from(pipe);
    let _ = writeln!(file, "EXIT {code}");
}

/// What the readiness pipe said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Nothing more yet.
    Nothing,
    /// The new process is ready.
    Ready,
    /// The pipe closed without [`READY`]: the new process exited (or closed it) first.
    Gone,
}

/// The new process's PID, if an intermediate process said it (`PID n`).
pub fn said_pid(heard: &[u8]) -> Option<libc::pid_t> {
    said_number(heard, "PID ").and_then(|n| libc::pid_t::try_from(n).ok())
}

/// The exit status the new process said it is exiting with (`EXIT n`), if it did.
pub fn said_exit(heard: &[u8]) -> Option<u32> {
    said_number(heard, "EXIT ")
}

fn said_number(heard: &[u8], word: &str) -> Option<u32> {
    let text = std::str::from_utf8(heard).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(word))
        .and_then(|n| n.trim().parse().ok())
}

/// Reads what the readiness pipe (non-blocking) has, until it would block.
pub fn listen(pipe: &OwnedFd, heard: &mut Vec<u8>) -> Heard {
    let mut file = std::mem::ManuallyDrop::new(
        // SAFETY: borrowed for the reads below; ManuallyDrop keeps it from closing the pipe.
        unsafe { std::fs::File::from_raw_fd(pipe.as_raw_fd()) },
    );
    let mut buf = [0u8; 64];
    loop {
        match file.read(&mut buf) {
            Ok(0) => {
                return if said_ready(heard) {
                    Heard::Ready
                } else {
                    Heard::Gone
                };
            }
            Ok(n) => {
                heard.extend_from_slice(buf.get(..n).unwrap_or_default());
                if said_ready(heard) {
                    return Heard::Ready;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Heard::Nothing,
        }
    }
}

fn said_ready(heard: &[u8]) -> bool {
    let word = READY.strip_suffix(b"\n").unwrap_or(READY);
    heard.split(|&b| b == b'\n').any(|line| line == word)
}

/// How a child ended, as logged.
pub fn describe_exit(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("ended ({status})")
    }
}

/// A signal set with nothing in it.
fn empty_sigset() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value, and sigemptyset makes it the empty set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

/// Reaps `pid` if it has exited (never blocks); its wait status.
pub fn reap(pid: libc::pid_t) -> Option<libc::c_int> {
    let mut status = 0;
    // SAFETY: waitpid writes the status of our own child into a valid integer.
    let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (got == pid).then_some(status)
}

/// Waits for `pid` to exit and reaps it; its wait status (0 if there was none to wait for).
/// Only for a child just sent SIGKILL, after the loop (and in tests).
pub fn reap_blocking(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    // SAFETY: as above; EINTR is retried, any other error means there is nothing to wait for.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    status
}

/// Reaps any other exited children (never blocks), so none is left a zombie.
pub fn reap_any() {
    let mut status = 0;
    // SAFETY: as above, for any child.
    while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
}

/// Sends `signal` to `pid`.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(pid, signal) };
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened for us alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn cstring(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(invalid)
}

fn cstr(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(invalid)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (with poll(2), at most 10 s per wake-up) until the pipe says ready or closes.
    fn hear_out(started: &Started) -> (Heard, Vec<u8>) {
        let mut heard = Vec::new();
        loop {
            let mut poll = libc::pollfd {
                fd: started.ready.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes the one valid pollfd it is given.
            assert_eq!(
                unsafe { libc::poll(&mut poll, 1, 10_000) },
                1,
                "no word from the child"
            );
            match listen(&started.ready, &mut heard) {
                Heard::Nothing => continue,
                other => return (other, heard),
            }
        }
    }

    #[test]
    fn the_executable_is_an_absolute_path_resolved_now() {
        let exe = executable_at_startup().expect("the test binary");
        assert!(exe.is_absolute(), "{exe:?}");
        assert!(exe.is_file());
    }

    #[test]
    fn a_child_gets_the_sockets_at_3_and_its_own_pid_and_says_ready() {
        // A shell stands in for the new greenlight: it reports what it was handed, then
        // writes READY on the descriptor named by GREENLIGHT_READY_FD.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let script = r#"
            test "$LISTEN_PID" = "$$" || exit 3
            test "$LISTEN_FDS" = 1 && test "$LISTEN_FDNAMES" = api || exit 4
            test -e /proc/self/fd/3 || exit 5
            printf 'READY\n' >&4
        "#;
        let args = [OsString::from("-c"), OsString::from(script)];
        let handed = [Handed {
            fd: listener.as_raw_fd(),
            name: "api",
        }];
        let started = spawn(Path::new("/bin/sh"), &args, &handed, true, 1024, false).unwrap();
        let (outcome, _) = hear_out(&started);
        assert_eq!(outcome, Heard::Ready);
        assert_eq!(
            describe_exit(reap_blocking(started.pid)),
            "exited with status 0"
        );
    }

    #[test]
    fn a_child_starts_with_default_signal_dispositions_and_nothing_blocked() {
        // This process ignores SIGPIPE (Rust's runtime does) and forks with every signal
        // blocked: the new program must inherit neither. (Bit N - 1 of /proc's masks is signal
        // N: SIGTERM 15, SIGPIPE 13. Only those two are looked at: the shell blocks SIGCHLD
        // around its own children now and then.)
        let script = r#"
            blocked=$(sed -n 's/^SigBlk:\t*//p' /proc/$$/status)
            [ $((0x$blocked & 0x4000)) = 0 ] || exit 3
            ignored=$(sed -n 's/^SigIgn:\t*//p' /proc/$$/status)
            [ $((0x$ignored & 0x1000)) = 0 ] || exit 4
            printf 'READY\n' >&3
        "#;
        let args = [OsString::from("-c"), OsString::from(script)];
        let started = spawn(Path::new("/bin/sh"), &args, &[], true, 1024, false).unwrap();
        let (outcome, _) = hear_out(&started);
        assert_eq!(
            describe_exit(reap_blocking(started.pid)),
            "exited with status 0"
        );
        assert_eq!(outcome, Heard::Ready);
    }

    #[test]
    fn a_child_that_cannot_start_is_gone_before_ready() {
        let started = spawn(
            Path::new("/nonexistent/greenlight"),
            &[],
            &[],
            false,
            1024,
            false,
        )
        .unwrap();
        assert_eq!(
            describe_exit(reap_blocking(started.pid)),
            "exited with status 127"
        );
        let mut heard = Vec::new();
        assert_eq!(listen(&started.ready, &mut heard), Heard::Gone);
        assert_eq!(said_exit(&heard), Some(127));
    }

    #[test]
    fn a_detached_child_is_not_ours_and_its_pid_and_exit_come_over_the_pipe() {
        let started = spawn(
            Path::new("/nonexistent/greenlight"),
            &[],
            &[],
            false,
            1024,
            true,
        )
        .unwrap();
        assert_eq!(
            describe_exit(reap_blocking(started.pid)),
            "exited with status 0"
        );
        let (outcome, heard) = hear_out(&started);
        assert_eq!(outcome, Heard::Gone);
        let grandchild = said_pid(&heard).expect("PID line");
        assert_ne!(grandchild, started.pid);
        assert_eq!(said_exit(&heard), Some(127));
        // Not our child: waitpid refuses it.
        let mut status = 0;
        // SAFETY: waitpid writes into the valid integer it is given.
        assert_eq!(
            unsafe { libc::waitpid(grandchild, &mut status, libc::WNOHANG) },
            -1
        );
    }
}
