//! The supervisor's side of an upgrade in place: SIGHUP starts the new process with every
//! listening socket; once it says it is ready, this process stops accepting (the sockets and
//! their queues belong to the new one now), answers with `Connection: close` for a short grace,
//! then drains. If the new process fails, this one serves on as if nothing happened.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use slog::{debug, error, info, warn};

use super::{Supervisor, Timer};
use crate::mailbox::Command;
use crate::shutdown::Phase;
use crate::systemd::Notice;
use crate::upgrade::{self, Handed, Heard, UPGRADE_GRACE};

/// The readiness pipe's token in the supervisor's poll.
pub(super) const UPGRADE_READY: Token = Token(3);

/// An upgrade under way.
pub(super) struct Upgrading {
    /// Our child: the new process, or (detached) the intermediate that started it.
    pid: libc::pid_t,
    /// The new process, once known (at once, or from the intermediate's `PID n` line).
    new_pid: Option<libc::pid_t>,
    /// Started through an intermediate (under systemd): the new process is not our child.
    detached: bool,
    ready: OwnedFd,
    heard: Vec<u8>,
    stage: Stage,
    /// When it must be ready by (its timer is cancelled once the upgrade is decided, so a
    /// stale one can never cut a later upgrade short).
    deadline: Instant,
}

/// Where the new process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Started; not ready yet.
    Starting,
    /// Closed its pipe without saying ready: failed, to be reaped (its status is then logged).
    Gone,
    /// Done with, its end already logged: killed (not ready in time, or abandoned at a stop)
    /// or gone with an exit status it said itself. Reaped quietly.
    Dismissed,
    /// Ready: it serves the sockets now; reaped only if it exits while this one still drains.
    Serving,
}

impl Supervisor {
    /// SIGHUP while serving: start the executable this process was started from.
    pub(super) fn start_upgrade(&mut self) {
        if let Some(upgrading) = &self.upgrade {
            warn!(self.log, "ignoring SIGHUP: an upgrade is already in progress"; "pid" => upgrading.pid);
            return;
        }
        if std::process::id() == 1 {
            // PID 1 of a container: when it exits, the kernel kills the whole PID namespace,
            // the new process with it, and the service would be gone.
            error!(self.log, "upgrade failed"; "reason" => "this process is PID 1 (a container without an init): the new process would die with it; run the container with an init (podman or docker run --init)");
            return;
        }
        let Some(exe) = self.exe.clone() else {
            error!(self.log, "upgrade failed"; "reason" => "cannot tell which executable started this process");
            return;
        };
        let mut sockets = Vec::new();
        if let Some(acceptor) = &mut self.acceptor {
            sockets.push(Handed {
                fd: acceptor.listener_mut().socket_mut().as_raw_fd(),
                name: "api",
            });
        }
        if let Some(admin) = &self.admin {
            sockets.push(Handed {
                fd: admin.listener_fd(),
                name: "admin",
            });
        }
        let original_soft = self.fd_limits.original_soft;
        // Under systemd the new process must be the manager's child before MAINPID= names it.
        let detached = self.notify_systemd && std::env::var_os("NOTIFY_SOCKET").is_some();
        let started = upgrade::spawn(
            &exe,
            &self.args,
            &sockets,
            self.owns_sockets,
            original_soft,
            detached,
        );
        let started = match started {
            Ok(started) => started,
            Err(e) => {
                error!(self.log, "upgrade failed"; "reason" => format!("cannot start {}: {e}", exe.display()));
                return;
            }
        };
        let fd = started.ready.as_raw_fd();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), UPGRADE_READY, Interest::READABLE)
        {
            error!(self.log, "upgrade failed"; "reason" => format!("cannot watch the new process: {e}"));
            upgrade::kill(started.pid, libc::SIGKILL);
            return;
        }
        let new_pid = (!detached).then_some(started.pid);
        info!(self.log, "upgrading: started the new process"; "pid" => new_pid,
              "path" => %exe.display(), "detached" => detached,
              "timeout_ms" => self.upgrade_timeout.as_millis() as u64);
        let status = format!("upgrading to {}", exe.display());
        self.tell_systemd(Notice::Reloading(&status));
        let deadline = self.now + self.upgrade_timeout;
        self.timers
            .reschedule(Timer::UpgradeTimeout, None, Some(deadline));
        self.upgrade = Some(Upgrading {
            pid: started.pid,
            new_pid,
            detached,
            ready: started.ready,
            heard: Vec::new(),
            stage: Stage::Starting,
            deadline,
        });
    }

    /// The readiness pipe has something: ready, or gone without a word.
    pub(super) fn on_upgrade_pipe(&mut self) {
        let Some(upgrading) = &mut self.upgrade else {
            return;
        };
        if upgrading.stage != Stage::Starting {
            return;
        }
        let heard = upgrade::listen(&upgrading.ready, &mut upgrading.heard);
        if upgrading.new_pid.is_none() {
            upgrading.new_pid = upgrade::said_pid(&upgrading.heard);
            if let Some(pid) = upgrading.new_pid {
                info!(self.log, "upgrading: the new process is running"; "pid" => pid);
            }
        }
        match heard {
            Heard::Nothing => {}
            // Detached, MAINPID= must name the new process: wait for the intermediate's line
            // (its write makes the pipe readable again).
            Heard::Ready if upgrading.new_pid.is_none() => {}
            Heard::Ready => self.hand_over(),
            Heard::Gone => {
                let said = upgrade::said_exit(&upgrading.heard);
                // Having said its status, it is logged from that: its reaping stays quiet.
                upgrading.stage = if said.is_some() {
                    Stage::Dismissed
                } else {
                    Stage::Gone
                };
                let (pid, detached, deadline) = (
                    upgrading.new_pid.unwrap_or(upgrading.pid),
                    upgrading.detached,
                    upgrading.deadline,
                );
                self.forget_pipe();
                match (said, detached) {
                    (Some(code), _) => {
                        self.upgrade_failed(pid, &format!("exited with status {code}"));
                        self.settle_failed();
                    }
                    // Not our child: all it can tell is what it said before it went.
                    (None, true) => {
                        self.upgrade_failed(
                            pid,
                            "exited before it was ready (its own log says why)",
                        );
                        self.settle_failed();
                    }
                    // Ours: its status is logged once it is reaped (now, if it has exited).
                    (None, false) => self.reap(),
                }
                // Ours and still there: it has until the upgrade timeout to go.
                if self.child_still_exiting() {
                    self.timers
                        .reschedule(Timer::UpgradeTimeout, None, Some(deadline));
                }
            }
        }
    }

    /// The new process serves: stop accepting without closing, shutting down or draining the
    /// sockets (they and their queues are the new process's), close every connection as it
    /// answers for the grace, then drain.
    fn hand_over(&mut self) {
        let Some(pid) = self.upgrade.as_ref().map(|u| u.new_pid.unwrap_or(u.pid)) else {
            return;
        };
        self.forget_pipe();
        if let Some(upgrading) = &mut self.upgrade {
            upgrading.stage = Stage::Serving;
        }
        if let Some(mut acceptor) = self.acceptor.take() {
            let listener = acceptor.listener_mut();
            let _ = self.poll.registry().deregister(listener.socket_mut());
            self.handed_over.push(acceptor.into_listener());
        }
        if let Some(admin) = &mut self.admin {
            admin.stop_accepting(self.poll.registry());
        }
        self.shutdown_started = Some(std::time::SystemTime::now());
        let until = self.now + UPGRADE_GRACE;
        info!(self.log, "shutting down server"; "reason" => "upgrade", "new_pid" => pid,
              "connections" => self.crew.open(), "grace_ms" => UPGRADE_GRACE.as_millis() as u64,
              "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
        // The new process is the service now; from here on this one says nothing to systemd.
        self.tell_systemd(Notice::MainPid(pid.unsigned_abs()));
        self.notify_systemd = false;
        self.phase = Phase::HandingOver { until };
        self.timers
            .reschedule(Timer::HandoverEnd, None, Some(until));
        self.crew.tell_all(|| Command::CloseEveryResponse);
    }

    /// Not ready within `--upgrade-timeout`: kill it, serve on. One that closed its pipe
    /// without being ready, or said it exits, and is still there at that time is killed too.
    pub(super) fn upgrade_timed_out(&mut self) {
        if self.child_still_exiting()
            && let Some(upgrading) = &mut self.upgrade
        {
            let stage = upgrading.stage;
            upgrading.stage = Stage::Dismissed;
            upgrade::kill(upgrading.pid, libc::SIGKILL);
            if stage == Stage::Gone {
                let pid = upgrading.pid;
                self.upgrade_failed(pid, "closed its readiness pipe without being ready and had not exited by the upgrade timeout; killed it");
            }
            self.reap();
            return;
        }
        let Some(upgrading) = &mut self.upgrade else {
            return;
        };
        if upgrading.stage != Stage::Starting {
            return;
        }
        let pid = upgrading.new_pid.unwrap_or(upgrading.pid);
        upgrading.stage = Stage::Dismissed;
        upgrade::kill(pid, libc::SIGKILL);
        let reason = format!(
            "timed out: not ready within {} ms (--upgrade-timeout); killed it",
            self.upgrade_timeout.as_millis()
        );
        self.upgrade_failed(pid, &reason);
        self.forget_pipe();
        self.settle_failed();
    }

    /// A failed upgrade is settled: reap our child if it is done (detached, it is the
    /// intermediate, long gone; the new process is the service manager's to reap).
    fn settle_failed(&mut self) {
        let detached = self.upgrade.as_ref().is_some_and(|u| u.detached);
        if detached {
            if let Some(upgrading) = &self.upgrade {
                let _ = upgrade::reap(upgrading.pid);
            }
            self.upgrade = None;
        } else {
            self.reap();
        }
    }

    /// SIGTERM/SIGINT while a new process is starting: it never served, so it goes too.
    pub(super) fn abandon_upgrade(&mut self) {
        let Some(upgrading) = &mut self.upgrade else {
            return;
        };
        if upgrading.stage == Stage::Starting {
            // Its READY may have come in the same batch of events as the signal: a new process
            // that is ready serves on, and this one drains as on any stop during the grace.
            self.on_upgrade_pipe();
        }
        let Some(upgrading) = &mut self.upgrade else {
            return;
        };
        if upgrading.stage == Stage::Starting {
            upgrading.stage = Stage::Dismissed;
            let pid = upgrading.new_pid.unwrap_or(upgrading.pid);
            warn!(self.log, "stopping during an upgrade: stopping the new process too"; "pid" => pid);
            upgrade::kill(pid, libc::SIGTERM);
            self.forget_pipe();
        }
    }

    /// A new process of ours that failed or was stopped and has not exited yet: the drain
    /// waits for it, so this process never leaves it running (or a zombie) behind.
    pub(super) fn child_still_exiting(&self) -> bool {
        self.upgrade
            .as_ref()
            .is_some_and(|u| !u.detached && matches!(u.stage, Stage::Gone | Stage::Dismissed))
    }

    /// Exiting with such a child still there (forced, SIGQUIT, or the deadline): kill it and
    /// wait for it, which SIGKILL makes prompt. The loop is over; this is the last step.
    pub(super) fn kill_child_still_exiting(&mut self) {
        if !self.child_still_exiting() {
            return;
        }
        if let Some(upgrading) = self.upgrade.take() {
            upgrade::kill(upgrading.pid, libc::SIGKILL);
            let _ = upgrade::reap_blocking(upgrading.pid);
            debug!(self.log, "killed the new process on the way out"; "pid" => upgrading.pid);
        }
    }

    /// SIGCHLD: reap the new process if it has exited, so none is left a zombie.
    pub(super) fn reap(&mut self) {
        let Some(upgrading) = &self.upgrade else {
            upgrade::reap_any();
            return;
        };
        let (pid, stage) = (upgrading.pid, upgrading.stage);
        let Some(status) = upgrade::reap(pid) else {
            return;
        };
        let how = upgrade::describe_exit(status);
        if upgrading.detached {
            // The intermediate: it exits at once; only a failure to fork matters.
            if stage == Stage::Starting
                && !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
            {
                self.upgrade_failed(pid, &format!("could not start the new process ({how})"));
                self.forget_pipe();
                self.upgrade = None;
            }
            return;
        }
        match stage {
            Stage::Starting | Stage::Gone => self.upgrade_failed(pid, &how),
            Stage::Dismissed => {
                debug!(self.log, "reaped the new process"; "pid" => pid, "status" => how)
            }
            Stage::Serving => {
                warn!(self.log, "the new process has exited"; "pid" => pid, "status" => how)
            }
        }
        self.forget_pipe();
        self.upgrade = None;
    }

    /// Logs the failure and serves on: systemd hears the service is ready again.
    fn upgrade_failed(&mut self, pid: libc::pid_t, reason: &str) {
        error!(self.log, "upgrade failed"; "pid" => pid, "reason" => reason);
        if self.phase == Phase::Serving {
            let status = format!("serving on {}", self.addr);
            self.tell_systemd(Notice::Ready(&status));
        }
    }

    /// The upgrade is decided: stop watching the readiness pipe, cancel its timeout.
    fn forget_pipe(&mut self) {
        if let Some(upgrading) = &self.upgrade {
            let fd = upgrading.ready.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            self.timers
                .reschedule(Timer::UpgradeTimeout, Some(upgrading.deadline), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::config::Config;
    use crate::shutdown::Signal;

    #[test]
    fn sigterm_in_the_same_batch_as_ready_keeps_the_new_process() {
        // READY is waiting on the pipe, unread, when SIGTERM is handled (both came in one batch
        // of events, the signal first): the new process already serves, so it must be handed
        // over to, not stopped.
        let args = ["greenlight", "--host", "127.0.0.1", "--port", "0"];
        let config = Config::try_parse_from(args).unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let mut supervisor = Supervisor::bind(&config, log).unwrap();
        let mut new_process = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (ready, mut said) = std::io::pipe().unwrap();
        said.write_all(b"READY\n").unwrap();
        let pid = new_process.id() as libc::pid_t;
        supervisor.upgrade = Some(Upgrading {
            pid,
            new_pid: Some(pid),
            detached: false,
            ready: ready.into(),
            heard: Vec::new(),
            stage: Stage::Starting,
            deadline: supervisor.now + Duration::from_secs(10),
        });

        supervisor.begin_shutdown(Signal::Term);

        let stage = supervisor.upgrade.as_ref().map(|u| u.stage);
        let alive = new_process.try_wait().unwrap().is_none();
        new_process.kill().unwrap();
        new_process.wait().unwrap();
        assert_eq!(stage, Some(Stage::Serving));
        assert!(alive, "the new process was stopped");
        assert!(matches!(supervisor.phase, Phase::Draining { .. }));
    }
}
