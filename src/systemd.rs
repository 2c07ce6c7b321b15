//! The service manager: readiness and status notifications (`Type=notify`), the watchdog, and
//! socket activation. Outside systemd (no `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `LISTEN_FDS`)
//! every function here does nothing.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Socket, Type};

/// The listening sockets systemd passed (`LISTEN_FDS`/`LISTEN_PID` naming this process).
#[derive(Debug, Default)]
pub struct Inherited {
    /// The API socket: the one named `api`, or the only one not named `admin`.
    pub api: Option<std::net::TcpListener>,
    /// The admin socket: the one named `admin` (`FileDescriptorName=admin`).
    pub admin: Option<std::net::TcpListener>,
}

/// The sockets systemd passed, by name (`LISTEN_FDNAMES`). Call it before opening any
/// descriptor: fd 3 must still be the one systemd passed (if it was closed, the next descriptor
/// opened would take its number). systemd keeps its own copies: connections that arrive while
/// the service restarts wait in their queues for the next process. So these sockets are never
/// `shutdown()`, only closed.
pub fn inherited_listeners() -> io::Result<Inherited> {
    // LISTEN_FDS is input from the environment: sd_notify checks each descriptor is open.
    let fds = sd_notify::listen_fds_with_names().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("LISTEN_FDS names a descriptor that is not usable: {e}"),
        )
    })?;
    let mut named = Vec::new();
    for (fd, name) in fds {
        // SAFETY: systemd passed this open descriptor to this process (LISTEN_PID matched) and
        // nothing else in the process owns it.
        let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
        named.push((socket, name));
    }
    pick_listeners(named)
}

/// Which passed socket is which: `admin` by name; the API by the name `api`, or as the only
/// other one. Anything else is a unit mistake worth stopping for.
fn pick_listeners(named: Vec<(Socket, String)>) -> io::Result<Inherited> {
    let mut inherited = Inherited::default();
    let mut others = Vec::new();
    for (socket, name) in named {
        match name.as_str() {
            "admin" => inherited.admin = Some(listening(socket, &name)?),
            "api" => inherited.api = Some(listening(socket, &name)?),
            _ => others.push((socket, name)),
        }
    }
    match (inherited.api.is_some(), others.len()) {
        (_, 0) => {}
        (false, 1) => {
            if let Some((socket, name)) = others.pop() {
                inherited.api = Some(listening(socket, &name)?);
            }
        }
        _ => {
            let names: Vec<&str> = others.iter().map(|(_, name)| name.as_str()).collect();
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "systemd passed sockets named {names:?}: name the API socket api and the admin socket admin (FileDescriptorName=)"
                ),
            ));
        }
    }
    if inherited.admin.is_some() && inherited.api.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "systemd passed an admin socket but no API socket",
        ));
    }
    Ok(inherited)
}

/// A passed socket, checked to be a listening stream socket.
fn listening(socket: Socket, name: &str) -> io::Result<std::net::TcpListener> {
    if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the socket {name:?} passed by systemd is not a listening stream socket (ListenStream=)"
            ),
        ));
    }
    Ok(socket.into())
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
    /// `STOPPING=1` and a status line: the lame duck or the drain began.
    Stopping(&'a str),
    /// A status line for `systemctl status`.
    Status(&'a str),
    /// `WATCHDOG=1`: the loop is alive.
    Watchdog,
    /// `RELOADING=1` and a status line: an upgrade in place began.
    Reloading(&'a str),
    /// `MAINPID=`: the upgrade's new process is the service now.
    MainPid(u32),
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
        Notice::Reloading(status) => {
            sd_notify::notify(&[NotifyState::Reloading, NotifyState::Status(status)])
        }
        Notice::MainPid(pid) => sd_notify::notify(&[NotifyState::MainPid(pid)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> Socket {
        Socket::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn named(names: &[&str]) -> Vec<(Socket, String)> {
        names.iter().map(|n| (listener(), n.to_string())).collect()
    }

    #[test]
    fn passed_sockets_are_told_apart_by_name() {
        let both = pick_listeners(named(&["api", "admin"])).unwrap();
        assert!(both.api.is_some() && both.admin.is_some());
        let unnamed_and_admin = pick_listeners(named(&["greenlight.socket", "admin"])).unwrap();
        assert!(unnamed_and_admin.api.is_some() && unnamed_and_admin.admin.is_some());
        let one = pick_listeners(named(&["unknown"])).unwrap();
        assert!(one.api.is_some() && one.admin.is_none());
        assert!(
            pick_listeners(named(&["a", "b"])).is_err(),
            "which is the API?"
        );
        assert!(pick_listeners(named(&["admin"])).is_err(), "no API socket");
        let none = pick_listeners(Vec::new()).unwrap();
        assert!(none.api.is_none() && none.admin.is_none());
    }
}
