//! The supervisor: the one owner of the process-wide decisions. Its own small `mio::Poll` loop
//! holds the signals, the listening socket (it accepts and deals connections round-robin to
//! the workers), the phase and the one shutdown deadline, systemd's notifications and the
//! watchdog, which it feeds only while every worker's loop is turning.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
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
use crate::mailbox::{Inbox, Report, STALL_LIMIT, WAKER, mailbox, millis_since};
use crate::shutdown::{Exit, HANDLED_SIGNALS, Phase, Signal, Transition};
use crate::systemd::{self, Notice};
use crate::timers::Timers;
use crate::upgrade;
use stopping::DrainStart;
use upgrading::{UPGRADE_READY, Upgrading};

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
    /// The same for the admin listener.
    AdminAcceptResume,
    /// Time to tell systemd's watchdog the process is alive (if every loop turns).
    Watchdog,
    /// Stop waiting for the workers to answer a forced stop or a dump.
    GiveUp,
    /// The end of the lame duck: the drain begins.
    DrainDelayEnd,
    /// The end of an upgrade's grace: the old process drains.
    HandoverEnd,
    /// An upgrade's new process had this long to be ready.
    UpgradeTimeout,
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
    /// The descriptor limits found and set at start-up.
    fd_limits: FdLimits,
    addr: SocketAddr,
    /// The listener came from systemd (socket activation) or an upgrade, not from
    /// `--host`/`--port`.
    socket_activated: bool,
    /// No one else holds the listening sockets (not systemd): a drain takes their queues
    /// before closing them, since closing the last copy resets what waits in them.
    owns_sockets: bool,
    /// The executable and arguments this process was started with, for an upgrade.
    exe: Option<PathBuf>,
    args: Vec<OsString>,
    upgrade_timeout: Duration,
    /// The upgrade under way, if one is.
    upgrade: Option<Upgrading>,
    /// Started by an upgrade: the pipe to tell the old process we serve.
    ready_pipe: Option<OwnedFd>,
    /// Sockets handed over to a new process: no longer served, never closed or drained here.
    handed_over: Vec<Listener>,
    /// Still the service systemd knows: false once `MAINPID=` named an upgrade's new process.
    notify_systemd: bool,
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
        let owns_sockets = !socket_activated || upgrade::inherited_sockets_owned();
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
            fd_limits,
            socket_activated,
            owns_sockets,
            exe: upgrade::executable_at_startup(),
            args: std::env::args_os().skip(1).collect(),
            upgrade_timeout: config.upgrade_timeout,
            upgrade: None,
            ready_pipe: None,
            handed_over: Vec::new(),
            notify_systemd: true,
            watchdog: systemd::watchdog_interval(),
            stall_logged: false,
            reported_draining: None,
            env: config.env,
            config: config.clone(),
            log,
        })
    }

    /// Started by an upgrade: the pipe to tell the old process on, once serving (`READY`), or,
    /// if this process stops before that, with what status (`EXIT n`).
    pub fn announcing_to(mut self, pipe: Option<OwnedFd>) -> Supervisor {
        self.ready_pipe = pipe;
        self
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::addr)
    }

    /// Files the end of an admin accept pause (out of descriptors), if there is one.
    fn pause_admin_accepting(&mut self, resume: Option<Instant>) {
        if let Some(resume) = resume {
            self.accept_pauses += 1;
            self.timers
                .reschedule(Timer::AdminAcceptResume, None, Some(resume));
        }
    }

    /// Accepts what the admin listener has queued.
    fn accept_admin(&mut self) {
        if let Some(admin) = &mut self.admin {
            let resume = admin.accept_ready(self.poll.registry(), self.now);
            self.pause_admin_accepting(resume);
        }
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
            max_connections: self.crew.max_connections(),
        };
        admin.update(probes, view);
    }

    /// Starts the workers, then runs the loop until the phase is `Stopped`; returns how to exit.
    pub fn run(mut self) -> Exit {
        if let Err(e) = self.crew.spawn(&self.config, &self.log) {
            crit!(self.log, "cannot start worker threads"; "error" => %e);
            if let Some(pipe) = self.ready_pipe.take() {
                upgrade::announce_exit(pipe, Exit::Forced.code());
            }
            return Exit::Forced;
        }
        if !self.await_workers() {
            if let Some(pipe) = self.ready_pipe.take() {
                upgrade::announce_exit(pipe, Exit::Forced.code());
            }
            return Exit::Forced;
        }
        if self.socket_activated {
            let from = if self.ready_pipe.is_some() {
                "using the listening sockets handed over by the previous process; --host and --port are ignored"
            } else {
                "using the listening socket passed by systemd; --host and --port are ignored"
            };
            info!(self.log, "{}", from; "addr" => %self.addr);
        }
        let admin_addr = self.admin.as_ref().map(Admin::addr);
        info!(self.log, "starting server"; "addr" => %self.addr, "env" => self.env.as_str(),
              "workers" => self.crew.len(), "max_fds" => self.fd_limits.soft,
              "max_connections" => self.crew.max_connections(),
              "admin_addr" => admin_addr.map(|addr| addr.to_string()));
        self.tell_systemd(Notice::Ready(&format!("serving on {}", self.addr)));
        if let Some(pipe) = self.ready_pipe.take()
            && let Err(e) = upgrade::announce_ready(pipe)
        {
            warn!(self.log, "cannot tell the previous process we are ready"; "error" => %e);
        }
        if let Some(interval) = self.watchdog {
            self.tell_systemd(Notice::Watchdog);
            self.timers
                .reschedule(Timer::Watchdog, None, Some(Instant::now() + interval));
        }
        // Readiness is edge-triggered, and the events polled while the workers started were
        // not acted on: whatever arrived meanwhile, on either listener, is taken now.
        self.now = Instant::now();
        self.accept_ready();
        self.update_probes();
        self.accept_admin();
        self.on_signals();

        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            if let Phase::Stopped(exit) = self.phase {
                self.kill_child_still_exiting();
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
                    UPGRADE_READY => self.on_upgrade_pipe(),
                    ADMIN_LISTENER => self.accept_admin(),
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
        if !self.notify_systemd {
            return;
        }
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
                Transition::Upgrade => self.start_upgrade(),
                Transition::RefuseUpgrade => {
                    warn!(self.log, "ignoring SIGHUP: the process is stopping or handing over";
                          "phase" => self.phase.name());
                }
                Transition::Reap => {
                    self.reap();
                    self.check_finished();
                }
                Transition::Ignore => {}
            }
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
                Timer::AdminAcceptResume => {
                    if let Some(admin) = &mut self.admin {
                        let resume = admin.resume_accepting(self.poll.registry(), self.now);
                        self.pause_admin_accepting(resume);
                    }
                }
                Timer::Watchdog => self.feed_watchdog(),
                Timer::DrainDelayEnd => {
                    if matches!(self.phase, Phase::LameDuck { .. }) {
                        self.begin_drain(DrainStart::DelayOver);
                    }
                }
                Timer::HandoverEnd => {
                    if matches!(self.phase, Phase::HandingOver { .. }) {
                        self.begin_drain(DrainStart::GraceOver);
                    }
                }
                Timer::UpgradeTimeout => self.upgrade_timed_out(),
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

mod stopping;
#[cfg(test)]
mod tests;
mod upgrading;
