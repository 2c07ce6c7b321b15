//! The service manager: readiness and status notifications (`Type=notify`), the watchdog, and
//! socket activation. Outside systemd (no `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `LISTEN_FDS`)
//! every function here does nothing.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Socket, Type};

/// The listening socket systemd passed (`LISTEN_FDS`/`LISTEN_PID` naming this process), if any.
/// Call it before opening any descriptor: fd 3 must still be the one systemd passed (if it
/// was closed, the next descriptor opened would take its number).
/// systemd keeps its own copy: connections that arrive while the service restarts wait in its
/// queue for the next process. So this socket is never `shutdown()`, only closed.
pub fn inherited_listener() -> io::Result<Option<std::net::TcpListener>> {
    // LISTEN_FDS is input from the environment: sd_notify checks each descriptor is open.
    let mut fds = sd_notify::listen_fds().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("LISTEN_FDS names a descriptor that is not usable: {e}"),
        )
    })?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    // SAFETY: systemd passed this open descriptor to this process (LISTEN_PID matched) and
    // nothing else in the process owns it.
    let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket passed by systemd is not a listening stream socket (ListenStream=)",
        ));
    }
    Ok(Some(socket.into()))
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, when systemd set it for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|interval| !interval.is_zero())
        .map(|interval| interval / 2)
}

/// What the service manager is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// `READY=1` and a status line: the listener is up and signals are handled.
    Ready(&'a str),
    /// `STOPPING=1` and a status line: the drain began.
    Stopping(&'a str),
    /// A status line for `systemctl status`.
    Status(&'a str),
    /// `WATCHDOG=1`: the loop is alive.
    Watchdog,
}

/// Sends a notice; a no-op without `NOTIFY_SOCKET`.
pub fn notify(notice: Notice<'_>) -> io::Result<()> {
    match notice {
        Notice::Ready(status) => {
            sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)])
        }
        Notice::Stopping(status) => {
            sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(status)])
        }
        Notice::Status(status) => sd_notify::notify(&[NotifyState::Status(status)]),
        Notice::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
    }
}
