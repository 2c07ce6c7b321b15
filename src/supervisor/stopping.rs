//! The supervisor stopping the process: the lame duck, the one drain across every worker with
//! one deadline, a forced stop, the SIGQUIT dump, and what the workers report on the way.

use std::time::{Duration, SystemTime};

use slog::{crit, info, warn};

use super::{GIVE_UP_AFTER, Supervisor, Timer};
use crate::mailbox::{Command, Report};
use crate::shutdown::{Exit, Phase, Signal};
use crate::systemd::Notice;

/// What began a drain, for its log line.
#[derive(Debug, Clone, Copy)]
pub(super) enum DrainStart {
    /// SIGINT/SIGTERM, with no drain delay (or cutting an upgrade's grace short).
    Signal(Signal),
    /// The end of the lame duck.
    DelayOver,
    /// The end of an upgrade's grace.
    GraceOver,
}

impl Supervisor {
    /// The first SIGINT/SIGTERM: with a drain delay, the lame duck (announce the departure and
    /// keep serving while the fleet reacts), else the drain at once. Either way one
    /// `shutting down server` line, logged at once.
    pub(super) fn begin_shutdown(&mut self, signal: Signal) {
        self.abandon_upgrade();
        if matches!(self.phase, Phase::HandingOver { .. }) {
            // Stopping as usual: the grace is cut short, no drain delay (the host stays).
            self.begin_drain(DrainStart::Signal(signal));
            return;
        }
        self.shutdown_started = Some(SystemTime::now());
        if self.drain_delay.is_zero() {
            self.begin_drain(DrainStart::Signal(signal));
            return;
        }
        let until = self.now + self.drain_delay;
        info!(self.log, "shutting down server"; "signal" => signal.name(), "reason" => "signal",
              "connections" => self.crew.open(), "timeout_ms" => self.shutdown_timeout.as_millis() as u64,
              "drain_delay" => human(self.drain_delay), "drain_delay_ms" => self.drain_delay.as_millis() as u64);
        self.phase = Phase::LameDuck { until };
        self.timers
            .reschedule(Timer::DrainDelayEnd, None, Some(until));
        let status = format!("lame duck: draining in {}", human(self.drain_delay));
        self.tell_systemd(Notice::Stopping(&status));
        // Listener and idle connections stay open; responses from now on say close.
        self.crew.tell_all(|| Command::CloseEveryResponse);
    }

    /// Stop accepting (after dealing out what is queued: closing a listener resets its queue),
    /// then tell every worker to drain, with one deadline for the process, counted from now
    /// (the end of the lame duck, if there was one). `signal` is the one that began the
    /// shutdown, when `shutting down server` is still to be logged (no lame duck).
    pub(super) fn begin_drain(&mut self, start: DrainStart) {
        let deadline = self.now + self.shutdown_timeout;
        self.drain_started = Some(self.now);
        // Our own listener: take what is queued, since closing it resets those connections.
        // systemd's: leave the queue to the next process (systemd keeps the socket open).
        if self.owns_sockets {
            if let Some(acceptor) = &mut self.acceptor {
                acceptor.resume();
            }
            self.accept_ready();
        }
        if let Some(mut acceptor) = self.acceptor.take() {
            let _ = self
                .poll
                .registry()
                .deregister(acceptor.listener_mut().socket_mut());
        }
        let open = self.crew.open();
        let timeout_ms = self.shutdown_timeout.as_millis() as u64;
        match start {
            // Logged once the listener is closed: from this line on, new connections are refused.
            DrainStart::Signal(signal) if !matches!(self.phase, Phase::HandingOver { .. }) => {
                info!(self.log, "shutting down server"; "signal" => signal.name(), "reason" => "signal",
                      "connections" => open, "timeout_ms" => timeout_ms,
                      "drain_delay" => human(self.drain_delay), "drain_delay_ms" => 0u64);
            }
            DrainStart::Signal(signal) => {
                info!(self.log, "draining before the upgrade grace is over"; "signal" => signal.name(),
                      "connections" => open, "timeout_ms" => timeout_ms);
            }
            DrainStart::DelayOver => {
                info!(self.log, "drain delay over, draining"; "connections" => open, "timeout_ms" => timeout_ms);
            }
            DrainStart::GraceOver => {
                info!(self.log, "upgrade grace over, draining"; "connections" => open, "timeout_ms" => timeout_ms);
            }
        }
        self.phase = Phase::Draining { deadline };
        self.timers
            .reschedule(Timer::ShutdownDeadline, None, Some(deadline));
        self.tell_systemd(Notice::Stopping(&draining_status(open)));
        self.reported_draining = Some(open);
        self.crew.drain();
    }

    /// The deadline or a second signal: every worker closes everything now; exit 1.
    pub(super) fn force_stop(&mut self) {
        self.crew.tell_all(|| Command::Force);
        self.end_after_answers(Exit::Forced);
    }

    /// SIGQUIT: every worker logs its connections; exit 2 without draining.
    pub(super) fn dump_and_quit(&mut self, signal: Signal) {
        warn!(self.log, "dumping connection table and quitting without draining";
              "signal" => signal.name(), "connections" => self.crew.open());
        // A new process still starting goes too (killed on the way out if it lingers).
        self.abandon_upgrade();
        self.crew.tell_all(|| Command::Dump);
        self.end_after_answers(Exit::Quit);
    }

    /// Waits for the workers' answers, at most [`GIVE_UP_AFTER`], then exits with `exit`.
    pub(super) fn end_after_answers(&mut self, exit: Exit) {
        self.phase = Phase::Ending(exit);
        self.timers
            .reschedule(Timer::GiveUp, None, Some(self.now + GIVE_UP_AFTER));
        self.check_finished();
    }

    pub(super) fn on_reports(&mut self) {
        while let Some(report) = self.reports.next() {
            if let Some(ended) = self.crew.apply(report)
                && matches!(
                    self.phase,
                    Phase::Serving | Phase::LameDuck { .. } | Phase::HandingOver { .. }
                )
            {
                self.worker_lost(ended.worker);
            }
            if let Report::Gone(worker) = report {
                self.worker_lost(worker);
            }
        }
        self.check_finished();
    }

    /// A worker ended on its own: never keep serving with a missing worker.
    pub(super) fn worker_lost(&mut self, worker: usize) {
        if matches!(self.phase, Phase::Ending(_) | Phase::Stopped(_)) {
            return;
        }
        crit!(self.log, "worker stopped unexpectedly, stopping the process"; "worker" => worker,
              "connections" => self.crew.open());
        self.force_stop();
    }

    /// Moves the phase on once the workers have all answered what was asked of them.
    pub(super) fn check_finished(&mut self) {
        match self.phase {
            // An abandoned new process is still exiting: SIGCHLD brings us back.
            Phase::Draining { .. } if self.crew.all_stopped() && self.child_still_exiting() => {}
            Phase::Draining { .. } if self.crew.all_stopped() => {
                if self.crew.all_clean() {
                    info!(self.log, "stopped server"; "addr" => %self.addr);
                    self.tell_systemd(Notice::Status("stopped"));
                    self.phase = Phase::Stopped(Exit::Clean);
                } else {
                    self.phase = Phase::Stopped(Exit::Forced);
                }
            }
            Phase::Draining { .. } => {
                let open = self.crew.draining_open();
                if open > 0 && self.reported_draining != Some(open) {
                    self.reported_draining = Some(open);
                    self.tell_systemd(Notice::Status(&draining_status(open)));
                }
            }
            Phase::Ending(Exit::Quit) if self.crew.all_dumped() => {
                self.phase = Phase::Stopped(Exit::Quit);
            }
            Phase::Ending(exit) if self.crew.all_stopped() => self.phase = Phase::Stopped(exit),
            Phase::Serving
            | Phase::LameDuck { .. }
            | Phase::HandingOver { .. }
            | Phase::Ending(_)
            | Phase::Stopped(_) => {}
        }
    }
}

/// A duration as people write it: `1s`, `250ms`, `1.5s`.
pub(super) fn human(duration: Duration) -> String {
    let millis = duration.as_millis();
    match (millis % 1000, millis / 1000) {
        (0, seconds) => format!("{seconds}s"),
        (ms, 0) => format!("{ms}ms"),
        (ms, seconds) => format!("{seconds}.{}s", format!("{ms:03}").trim_end_matches('0')),
    }
}

/// The status line `systemctl status` shows while draining.
pub(super) fn draining_status(open: usize) -> String {
    match open {
        1 => "draining 1 connection".to_string(),
        n => format!("draining {n} connections"),
    }
}
