//! The supervisor: the one owner of the process-wide decisions. Its own small `mio::Poll` loop
//! holds the signals, the listening socket (it accepts and deals connections round-robin to
//! the workers), the phase and the one shutdown deadline, systemd's notifications and the
//! watchdog, which it feeds only while every worker's loop is turning.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use slog::{Logger, crit, error, info, warn};

use crate::admin::{ADMIN_LISTENER, Admin};
use crate::app::Probes;
use crate::capacity::{self, FdLimits};
use crate::config::{Config, Environment};
use crate::conn::interrupted;
use crate::crew::Crew;
use crate::exposition::ProcessView;
use crate::listener::{Acceptor, Listener};
use crate::mailbox::{Command, Inbox, Report, STALL_LIMIT, WAKER, mailbox, millis_since};
use crate::shutdown::{Exit, HANDLED_SIGNALS, Phase, Signal, Transition};
use crate::systemd::{self, Notice};
use crate::timers::Timers;

/// Readiness events taken per `poll` call.
const EVENTS_CAPACITY: usize = 64;

/// The listener's token.
const LISTENER: Token = Token(0);

/// The signal pipe's token.
const SIGNALS: Token = Token(1);

/// How long a forced stop or a SIGQUIT dump waits for the workers to answer before the
/// process exits anyway: a worker stuck in a busy loop must not keep a stuck process alive.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(1);

/// How long start-up waits for every worker's loop to run before giving up.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What a supervisor's deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The end of the shutdown grace period.
    ShutdownDeadline,
    /// Accepting resumes after running out of file descriptors.
    AcceptResume,
    /// Time to tell systemd's watchdog the process is alive (if every loop turns).
    Watchdog,
    /// Stop waiting for the workers to answer a forced stop or a dump.
    GiveUp,
    /// The end of the lame duck: the drain begins.
    DrainDelayEnd,
}

/// The process: the supervisor's loop and the workers it deals connections to.
pub struct Supervisor {
    poll: Poll,
    /// The API listener; `None` once the drain has closed it.
    acceptor: Option<Acceptor>,
    /// The admin listener (`--admin-addr`, or systemd's socket named `admin`) and its connections.
    admin: Option<Admin>,
    signals: Signals,
    reports: Inbox<Report>,
    crew: Crew,
    timers: Timers<Timer>,
    phase: Phase,
    now: Instant,
    epoch: Instant,
    shutdown_timeout: Duration,
    /// The lame duck before the drain (`--drain-delay`).
    drain_delay: Duration,
    /// When the first SIGINT/SIGTERM came, and when the drain (after any lame duck) began.
    shutdown_started: Option<SystemTime>,
    drain_started: Option<Instant>,
    /// Times accepting paused for lack of descriptors (kept when the listener is closed).
    accept_pauses: u64,
    max_connections: usize,
    /// The descriptor limits found and set at start-up.
    fd_limits: FdLimits,
    addr: SocketAddr,
    /// The listener came from systemd (socket activation), not from `--host`/`--port`.
    socket_activated: bool,
    /// Half of systemd's `WatchdogSec=`, when it is set for this process.
    watchdog: Option<Duration>,
    /// A stalled loop was logged and has not recovered: one line per episode.
    stall_logged: bool,
    /// The connection count last reported to systemd while draining.
    reported_draining: Option<usize>,
    env: Environment,
    config: Config,
    log: Logger,
}

impl Supervisor {
    /// Binds the listener, installs the signal handlers and prepares every worker's poll and
    /// mailbox; the workers' threads start in [`Supervisor::run`]. After this a signal is
    /// handled gracefully.
    pub fn bind(config: &Config, log: Logger) -> io::Result<Supervisor> {
        // Before any socket is opened: as many descriptors as the hard limit allows.
        let fd_limits = capacity::raise_fd_limit().unwrap_or_else(|e| {
            let assumed = capacity::ASSUMED_FD_LIMIT;
            warn!(log, "cannot read the descriptor limit, assuming the usual soft limit";
                  "error" => %e, "max_fds" => assumed);
            FdLimits {
                original_soft: assumed,
                soft: assumed,
                hard: assumed,
            }
        });
        // First, before any descriptor is opened (fd 3 must be systemd's, not our epoll's).
        let inherited = systemd::inherited_listeners()?;
        let poll = Poll::new()?;
        let socket_activated = inherited.api.is_some();
        let mut listener = match inherited.api {
            Some(socket) => Listener::adopt(socket)?,
            None => Listener::bind(SocketAddr::new(config.host, config.port))?,
        };
        poll.registry()
            .register(listener.socket_mut(), LISTENER, Interest::READABLE)?;
        let admin_listener = match (inherited.admin, config.admin_addr) {
            (Some(socket), _) => Some(Listener::adopt(socket)?),
            (None, Some(addr)) => Some(Listener::bind(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on the admin address {addr}: {e}"),
                )
            })?),
            (None, None) => None,
        };

        let mut signals = Signals::new(HANDLED_SIGNALS)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let (report_outbox, reports) = mailbox(poll.registry())?;
        let epoch = Instant::now();
        let workers = config.workers.resolve();
        let needed = capacity::reserve(workers);
        if needed >= fd_limits.soft {
            return Err(io::Error::other(format!(
                "--workers {workers} needs more than {needed} file descriptors but the limit is {}: \
                 raise it (LimitNOFILE= under systemd, ulimit -Hn in a shell) or run fewer workers",
                fd_limits.soft
            )));
        }
        let cap = capacity::connection_cap(config.max_connections, fd_limits.soft, workers);
        let crew = Crew::prepare(workers, cap.max_connections, &report_outbox, epoch)?;
        let admin = match admin_listener {
            Some(listener) => Some(Admin::open(
                listener,
                poll.registry(),
                config,
                crew.metrics(),
                &log,
            )?),
            None => None,
        };
        if let Some(asked) = cap.lowered_from {
            warn!(log, "--max-connections is more than the descriptor limit allows, lowering it";
                  "asked" => asked, "max_connections" => cap.max_connections, "max_fds" => fd_limits.soft,
                  "hint" => "raise the hard limit: LimitNOFILE= under systemd, ulimit -Hn in a shell");
        }
        Ok(Supervisor {
            poll,
            addr: listener.addr(),
            acceptor: Some(Acceptor::new(listener)),
            admin,
            signals,
            reports,
            crew,
            timers: Timers::new(),
            phase: Phase::Serving,
            now: epoch,
            epoch,
            shutdown_timeout: config.shutdown_timeout,
            drain_delay: config.drain_delay,
            shutdown_started: None,
            drain_started: None,
            accept_pauses: 0,
            max_connections: cap.max_connections,
            fd_limits,
            socket_activated,
            watchdog: systemd::watchdog_interval(),
            stall_logged: false,
            reported_draining: None,
            env: config.env,
            config: config.clone(),
            log,
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::addr)
    }

    fn admin_timeout(&self, now: Instant) -> Option<Duration> {
        self.admin.as_ref().and_then(|admin| admin.timeout(now))
    }

    /// What the admin probes answer at this wake-up: ready only while serving (not in the lame
    /// duck or the drain), alive while every worker's loop turns (the watchdog's signal).
    fn update_probes(&mut self) {
        let Some(admin) = &mut self.admin else {
            return;
        };
        let probes = Probes {
            ready: self.phase == Phase::Serving,
            alive: self
                .crew
                .stalled(millis_since(self.epoch, self.now), STALL_LIMIT)
                .is_empty(),
        };
        let (accepted, over_limit) = self.crew.accept_counts();
        let view = ProcessView {
            draining: self.phase != Phase::Serving,
            shutdown_started: self.shutdown_started.map(|at| {
                at.duration_since(UNIX_EPOCH)
                    .map_or(0.0, |since| since.as_secs_f64())
            }),
            drain_seconds: self.drain_started.map_or(0.0, |at| {
                self.now.saturating_duration_since(at).as_secs_f64()
            }),
            accepted,
            over_limit,
            accept_pauses: self.accept_pauses,
            max_connections: self.max_connections,
        };
        admin.update(probes, view);
    }

    /// Starts the workers, then runs the loop until the phase is `Stopped`; returns how to exit.
    pub fn run(mut self) -> Exit {
        if let Err(e) = self.crew.spawn(&self.config, &self.log) {
            crit!(self.log, "cannot start worker threads"; "error" => %e);
            return Exit::Forced;
        }
        if !self.await_workers() {
            return Exit::Forced;
        }
        if self.socket_activated {
            info!(self.log, "using the listening socket passed by systemd; --host and --port are ignored";
                  "addr" => %self.addr);
        }
        let admin_addr = self.admin.as_ref().map(Admin::addr);
        info!(self.log, "starting server"; "addr" => %self.addr, "env" => self.env.as_str(),
              "workers" => self.crew.len(), "max_fds" => self.fd_limits.soft,
              "max_connections" => self.max_connections,
              "admin_addr" => admin_addr.map(|addr| addr.to_string()));
        self.tell_systemd(Notice::Ready(&format!("serving on {}", self.addr)));
        if let Some(interval) = self.watchdog {
            self.tell_systemd(Notice::Watchdog);
            self.timers
                .reschedule(Timer::Watchdog, None, Some(Instant::now() + interval));
        }
        // Readiness is edge-triggered: whatever arrived while the workers started is taken now.
        self.now = Instant::now();
        self.accept_ready();
        self.on_signals();

        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            if let Phase::Stopped(exit) = self.phase {
                return exit;
            }
            let now = Instant::now();
            let timeout = match (self.timers.timeout(now), self.admin_timeout(now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                error!(self.log, "poll failed"; "error" => %e);
                return Exit::Forced;
            }
            self.now = Instant::now();
            self.update_probes();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready(),
                    SIGNALS => self.on_signals(),
                    WAKER => self.on_reports(),
                    ADMIN_LISTENER => {
                        if let Some(admin) = &mut self.admin {
                            admin.accept_ready(self.poll.registry());
                        }
                    }
                    _ => {
                        if let Some(admin) = &mut self.admin {
                            admin.on_event(self.poll.registry(), event);
                        }
                    }
                }
            }
            self.expire_timers();
            if let Some(admin) = &mut self.admin {
                admin.expire(self.poll.registry());
            }
        }
    }

    /// Waits until every worker's loop runs; false (logged) if one ended or none came in time.
    fn await_workers(&mut self) -> bool {
        let give_up = Instant::now() + START_TIMEOUT;
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while self.crew.is_starting() {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                crit!(self.log, "worker threads did not start in time");
                return false;
            }
            match self.poll.poll(&mut events, Some(left)) {
                Ok(()) => {}
                Err(e) if interrupted(&e) => continue,
                Err(e) => {
                    crit!(self.log, "poll failed"; "error" => %e);
                    return false;
                }
            }
            while let Some(report) = self.reports.next() {
                if let Some(ended) = self.crew.apply(report) {
                    crit!(self.log, "worker stopped unexpectedly"; "worker" => ended.worker);
                    return false;
                }
            }
        }
        true
    }

    /// Sends a notice to systemd (nothing happens outside it); a failure is logged, not fatal.
    fn tell_systemd(&self, notice: Notice<'_>) {
        if let Err(e) = systemd::notify(notice) {
            warn!(self.log, "cannot notify systemd"; "error" => %e);
        }
    }

    /// Accepts until the queue is empty and deals the connections out, then wakes each worker
    /// that got one: one wake-up per worker per batch.
    fn accept_ready(&mut self) {
        let Some(acceptor) = &mut self.acceptor else {
            return;
        };
        let crew = &mut self.crew;
        let log = &self.log;
        let open = crew.open();
        let resume = acceptor.accept_all(
            self.now,
            log,
            || open,
            |stream, peer| crew.admit(stream, peer, log),
        );
        if let Some(resume) = resume {
            self.accept_pauses += 1;
            self.timers
                .reschedule(Timer::AcceptResume, None, Some(resume));
        }
        self.crew.wake_dealt();
    }

    fn on_signals(&mut self) {
        let raw: Vec<libc::c_int> = self.signals.pending().collect();
        for signal in raw.into_iter().filter_map(Signal::from_raw) {
            match self.phase.on_signal(signal) {
                Transition::BeginDrain => self.begin_shutdown(signal),
                Transition::ForceStop => {
                    error!(self.log, "second signal while draining, forcing shutdown";
                           "signal" => signal.name(), "connections" => self.crew.draining_open());
                    self.force_stop();
                }
                Transition::DumpAndQuit => self.dump_and_quit(signal),
                Transition::Ignore => {}
            }
        }
    }

    /// The first SIGINT/SIGTERM: with a drain delay, the lame duck (announce the departure and
    /// keep serving while the fleet reacts), else the drain at once. Either way one
    /// `shutting down server` line, logged at once.
    fn begin_shutdown(&mut self, signal: Signal) {
        self.shutdown_started = Some(SystemTime::now());
        if self.drain_delay.is_zero() {
            self.begin_drain(Some(signal));
            return;
        }
        let until = self.now + self.drain_delay;
        info!(self.log, "shutting down server"; "signal" => signal.name(),
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
    fn begin_drain(&mut self, signal: Option<Signal>) {
        let deadline = self.now + self.shutdown_timeout;
        self.drain_started = Some(self.now);
        // Our own listener: take what is queued, since closing it resets those connections.
        // systemd's: leave the queue to the next process (systemd keeps the socket open).
        if !self.socket_activated {
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
        match signal {
            // Logged once the listener is closed: from this line on, new connections are refused.
            Some(signal) => {
                info!(self.log, "shutting down server"; "signal" => signal.name(),
                      "connections" => open, "timeout_ms" => self.shutdown_timeout.as_millis() as u64,
                      "drain_delay" => human(self.drain_delay), "drain_delay_ms" => 0u64);
            }
            None => {
                info!(self.log, "drain delay over, draining"; "connections" => open,
                      "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
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
    fn force_stop(&mut self) {
        self.crew.tell_all(|| Command::Force);
        self.end_after_answers(Exit::Forced);
    }

    /// SIGQUIT: every worker logs its connections; exit 2 without draining.
    fn dump_and_quit(&mut self, signal: Signal) {
        warn!(self.log, "dumping connection table and quitting without draining";
              "signal" => signal.name(), "connections" => self.crew.open());
        self.crew.tell_all(|| Command::Dump);
        self.end_after_answers(Exit::Quit);
    }

    /// Waits for the workers' answers, at most [`GIVE_UP_AFTER`], then exits with `exit`.
    fn end_after_answers(&mut self, exit: Exit) {
        self.phase = Phase::Ending(exit);
        self.timers
            .reschedule(Timer::GiveUp, None, Some(self.now + GIVE_UP_AFTER));
        self.check_finished();
    }

    fn on_reports(&mut self) {
        while let Some(report) = self.reports.next() {
            if let Some(ended) = self.crew.apply(report)
                && matches!(self.phase, Phase::Serving | Phase::LameDuck { .. })
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
    fn worker_lost(&mut self, worker: usize) {
        if matches!(self.phase, Phase::Ending(_) | Phase::Stopped(_)) {
            return;
        }
        crit!(self.log, "worker stopped unexpectedly, stopping the process"; "worker" => worker,
              "connections" => self.crew.open());
        self.force_stop();
    }

    /// Moves the phase on once the workers have all answered what was asked of them.
    fn check_finished(&mut self) {
        match self.phase {
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
            Phase::Serving | Phase::LameDuck { .. } | Phase::Ending(_) | Phase::Stopped(_) => {}
        }
    }

    fn expire_timers(&mut self) {
        while let Some(key) = self.timers.pop_expired(self.now) {
            match key {
                Timer::ShutdownDeadline => {
                    if self.phase.drain_expired(self.now) {
                        error!(self.log, "shutdown deadline passed with connections still open, forcing them closed";
                               "connections" => self.crew.draining_open(),
                               "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
                        self.force_stop();
                    }
                }
                Timer::AcceptResume => {
                    if let Some(acceptor) = &mut self.acceptor {
                        acceptor.resume();
                    }
                    self.accept_ready();
                }
                Timer::Watchdog => self.feed_watchdog(),
                Timer::DrainDelayEnd => {
                    if matches!(self.phase, Phase::LameDuck { .. }) {
                        self.begin_drain(None);
                    }
                }
                Timer::GiveUp => {
                    if let Phase::Ending(exit) = self.phase {
                        let silent = self.crew.silent();
                        warn!(self.log, "workers did not answer in time, exiting without them";
                              "workers" => format!("{silent:?}"));
                        self.phase = Phase::Stopped(exit);
                    }
                }
            }
        }
    }

    /// `WATCHDOG=1`, but only while every worker's loop is turning: a worker stuck in a busy
    /// loop or a blocking call must let systemd's watchdog fire.
    fn feed_watchdog(&mut self) {
        let Some(interval) = self.watchdog else {
            return;
        };
        let stalled = self
            .crew
            .stalled(millis_since(self.epoch, self.now), STALL_LIMIT);
        if stalled.is_empty() {
            if self.stall_logged {
                info!(self.log, "every worker loop is turning again");
                self.stall_logged = false;
            }
            self.tell_systemd(Notice::Watchdog);
        } else if !self.stall_logged {
            error!(self.log, "a worker loop has stalled, not feeding the watchdog";
                   "workers" => format!("{stalled:?}"), "limit_ms" => STALL_LIMIT.as_millis() as u64);
            self.stall_logged = true;
        }
        self.timers
            .reschedule(Timer::Watchdog, None, Some(self.now + interval));
    }
}

/// A duration as people write it: `1s`, `250ms`, `1.5s`.
fn human(duration: Duration) -> String {
    let millis = duration.as_millis();
    match (millis % 1000, millis / 1000) {
        (0, seconds) => format!("{seconds}s"),
        (ms, 0) => format!("{ms}ms"),
        (ms, seconds) => format!("{seconds}.{}s", format!("{ms:03}").trim_end_matches('0')),
    }
}

/// The status line `systemctl status` shows while draining.
fn draining_status(open: usize) -> String {
    match open {
        1 => "draining 1 connection".to_string(),
        n => format!("draining {n} connections"),
    }
}

#[cfg(test)]
mod tests;
