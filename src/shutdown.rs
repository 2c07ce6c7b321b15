//! The server's phase and how signals move it: SIGINT/SIGTERM begin a drain, a second one
//! forces the stop, SIGQUIT dumps the connection table and quits at once, SIGHUP upgrades in
//! place, SIGCHLD reaps a new process that did not make it.

use std::time::Instant;

use libc::c_int;

/// The signals greenlight handles.
pub const HANDLED_SIGNALS: [c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGCHLD,
];

/// A handled signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Ctrl-C.
    Int,
    /// `kill`, systemd's `KillSignal`.
    Term,
    /// Ctrl-\: dump and quit.
    Quit,
    /// Upgrade in place (`systemctl reload`).
    Hup,
    /// A child (a new process being started by an upgrade) changed state.
    Child,
}

impl Signal {
    /// The signal for a raw number, if handled.
    pub fn from_raw(raw: c_int) -> Option<Signal> {
        match raw {
            libc::SIGINT => Some(Signal::Int),
            libc::SIGTERM => Some(Signal::Term),
            libc::SIGQUIT => Some(Signal::Quit),
            libc::SIGHUP => Some(Signal::Hup),
            libc::SIGCHLD => Some(Signal::Child),
            _ => None,
        }
    }

    /// The conventional name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
            Signal::Quit => "SIGQUIT",
            Signal::Hup => "SIGHUP",
            Signal::Child => "SIGCHLD",
        }
    }
}

/// How the process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: drained; every in-flight request was answered.
    Clean,
    /// 1: the deadline passed or a second signal came; connections were force-closed. Also
    /// used for start-up failures.
    Forced,
    /// 2: SIGQUIT; nothing was drained.
    Quit,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Clean => 0,
            Exit::Forced => 1,
            Exit::Quit => 2,
        }
    }
}

/// The server's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving. Leaves on SIGINT/SIGTERM to `LameDuck` (with a drain delay) or
    /// `Draining`, on SIGQUIT to `Ending(Quit)`.
    Serving,
    /// An upgrade's new process is ready and serving the sockets; this one no longer accepts
    /// and, until `until`, answers every request with `Connection: close` while its idle
    /// connections stay open. Leaves to `Draining` at `until` or on SIGINT/SIGTERM.
    HandingOver {
        /// When the drain begins.
        until: Instant,
    },
    /// Still accepting and serving, but announcing the departure: `/readyz` says 503 and every
    /// response says `Connection: close`. Leaves to `Draining` at `until`; a second
    /// SIGINT/SIGTERM forces the stop, SIGQUIT dumps.
    LameDuck {
        /// When the drain begins.
        until: Instant,
    },
    /// Not accepting; in-flight requests finish until `deadline`. Leaves to `Stopped`: clean
    /// when the last connection closes, forced at the deadline or on a second signal.
    Draining {
        /// When connections still open are force-closed (the timer set only wakes the loop).
        deadline: Instant,
    },
    /// Every worker was told to stop at once (`Forced`) or to log its connections (`Quit`);
    /// the supervisor waits for their answers, a bounded time, then stops with this exit.
    Ending(Exit),
    /// The loop returns this exit. Terminal.
    Stopped(Exit),
}

/// What a signal asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Begin the shutdown: the lame duck if there is a drain delay, else the drain at once
    /// (stop accepting, close idle connections, let active ones finish).
    BeginDrain,
    /// Close everything now and exit 1.
    ForceStop,
    /// Log the connection table and exit 2 without draining.
    DumpAndQuit,
    /// Start the upgrade: the new process, handed the sockets.
    Upgrade,
    /// An upgrade cannot start now (one is under way, or the process is stopping).
    RefuseUpgrade,
    /// Reap a child that exited.
    Reap,
    /// Nothing (already stopping).
    Ignore,
}

impl Phase {
    /// The transition a signal causes in this phase.
    pub fn on_signal(self, signal: Signal) -> Transition {
        match (self, signal) {
            (Phase::Stopped(_), _) => Transition::Ignore,
            (_, Signal::Child) => Transition::Reap,
            (Phase::Ending(_), _) => Transition::Ignore,
            (Phase::Serving, Signal::Hup) => Transition::Upgrade,
            (_, Signal::Hup) => Transition::RefuseUpgrade,
            (_, Signal::Quit) => Transition::DumpAndQuit,
            (Phase::Serving | Phase::HandingOver { .. }, _) => Transition::BeginDrain,
            (Phase::LameDuck { .. } | Phase::Draining { .. }, _) => Transition::ForceStop,
        }
    }

    /// A short name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::HandingOver { .. } => "handing over",
            Phase::LameDuck { .. } => "lame duck",
            Phase::Draining { .. } => "draining",
            Phase::Ending(_) => "ending",
            Phase::Stopped(_) => "stopped",
        }
    }

    /// Draining in-flight requests.
    pub fn is_draining(self) -> bool {
        matches!(self, Phase::Draining { .. })
    }

    /// Draining, and the grace period is over at `now`.
    pub fn drain_expired(self, now: Instant) -> bool {
        matches!(self, Phase::Draining { deadline } if deadline <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_transitions() {
        let draining = Phase::Draining {
            deadline: Instant::now(),
        };
        let lame_duck = Phase::LameDuck {
            until: Instant::now(),
        };
        let handing_over = Phase::HandingOver {
            until: Instant::now(),
        };
        let rows = [
            (Phase::Serving, Signal::Term, Transition::BeginDrain),
            (Phase::Serving, Signal::Int, Transition::BeginDrain),
            (Phase::Serving, Signal::Quit, Transition::DumpAndQuit),
            (draining, Signal::Int, Transition::ForceStop),
            (draining, Signal::Term, Transition::ForceStop),
            (draining, Signal::Quit, Transition::DumpAndQuit),
            (lame_duck, Signal::Term, Transition::ForceStop),
            (lame_duck, Signal::Int, Transition::ForceStop),
            (lame_duck, Signal::Quit, Transition::DumpAndQuit),
            (
                Phase::Stopped(Exit::Clean),
                Signal::Term,
                Transition::Ignore,
            ),
            (
                Phase::Ending(Exit::Forced),
                Signal::Term,
                Transition::Ignore,
            ),
            (Phase::Ending(Exit::Quit), Signal::Quit, Transition::Ignore),
            (Phase::Serving, Signal::Hup, Transition::Upgrade),
            (draining, Signal::Hup, Transition::RefuseUpgrade),
            (lame_duck, Signal::Hup, Transition::RefuseUpgrade),
            (handing_over, Signal::Hup, Transition::RefuseUpgrade),
            (handing_over, Signal::Term, Transition::BeginDrain),
            (handing_over, Signal::Quit, Transition::DumpAndQuit),
            (draining, Signal::Child, Transition::Reap),
            (Phase::Ending(Exit::Forced), Signal::Child, Transition::Reap),
        ];
        for (phase, signal, expected) in rows {
            assert_eq!(phase.on_signal(signal), expected, "{phase:?} + {signal:?}");
        }
    }

    #[test]
    fn the_drain_expires_at_its_deadline_only() {
        let now = Instant::now();
        let draining = Phase::Draining {
            deadline: now + std::time::Duration::from_secs(1),
        };
        assert!(!draining.drain_expired(now));
        assert!(draining.drain_expired(now + std::time::Duration::from_secs(1)));
        assert!(!Phase::Serving.drain_expired(now + std::time::Duration::from_secs(9)));
        assert!(!Phase::Stopped(Exit::Clean).drain_expired(now));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::Clean.code(), 0);
        assert_eq!(Exit::Forced.code(), 1);
        assert_eq!(Exit::Quit.code(), 2);
        assert_eq!(
            Signal::from_raw(libc::SIGTERM).map(Signal::name),
            Some("SIGTERM")
        );
        assert_eq!(Signal::from_raw(libc::SIGHUP), Some(Signal::Hup));
        assert_eq!(Signal::from_raw(libc::SIGUSR1), None);
    }
}
