//! The supervisor: the one owner of the process-wide decisions. Its own small `mio::Poll` loop
//! holds the signals, the listening socket (it accepts and deals connections round-robin to
//! the workers), the phase and the one shutdown deadline, systemd's notifications and the
//! watchdog, which it feeds only while every worker's loop is turning.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use slog::{Logger, crit, error, info, warn};

use crate::config::{Config, Environment};
use crate::conn::interrupted;
use crate::listener::{ACCEPT_PAUSE, Accept, Listener};
use crate::mailbox::{
    Command, Inbox, Outbox, Report, STALL_LIMIT, WAKER, WorkerStats, mailbox, millis_since, stalled,
};
use crate::shutdown::{Exit, HANDLED_SIGNALS, Phase, Signal, Transition};
use crate::systemd::{self, Notice};
use crate::timers::Timers;
use crate::worker::{Setup, Worker};

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
}

/// Where a worker is, as far as the supervisor knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    /// Spawned; its loop has not reported `Ready` yet.
    Starting,
    /// Serving.
    Serving,
    /// Told to drain; `open` is its last reported connection count.
    Draining { open: Option<usize> },
    /// Logged its connection table (SIGQUIT).
    Dumped,
    /// Its loop returned. Terminal.
    Stopped(Exit),
}

/// The supervisor's handle on one worker.
struct WorkerSlot {
    outbox: Outbox<Command>,
    stats: Arc<WorkerStats>,
    /// Connections handed to it, ever.
    handed: u64,
    /// Commands were queued since its last wake-up.
    needs_wake: bool,
    state: WorkerState,
    /// Its setup, until its thread is spawned.
    setup: Option<Setup>,
}

impl WorkerSlot {
    /// Connections open in this worker: handed minus closed (may count a few just closing).
    fn open(&self) -> usize {
        self.handed.saturating_sub(self.stats.closed()) as usize
    }

    fn tell(&mut self, command: Command) {
        self.outbox.send(command);
        self.needs_wake = false;
    }
}

/// The process: the supervisor's loop and the workers it deals connections to.
pub struct Supervisor {
    poll: Poll,
    listener: Option<Listener>,
    /// Accepting is paused until the `AcceptResume` deadline (out of descriptors).
    accept_paused: bool,
    /// `accept` has failed for want of resources and not succeeded since: one episode, one
    /// log line (a retry every pause would flood the log).
    accept_exhausted: bool,
    /// A connection over `--max-connections` was refused and not yet logged as recovered.
    over_limit: bool,
    signals: Signals,
    reports: Inbox<Report>,
    workers: Vec<WorkerSlot>,
    /// The worker the next connection goes to (round-robin).
    next_worker: usize,
    /// Connections handed to workers, ever, and the workers' closed total last read: their
    /// difference bounds the open count from above without reading every worker per accept.
    handed: u64,
    closed_seen: u64,
    timers: Timers<Timer>,
    phase: Phase,
    now: Instant,
    epoch: Instant,
    shutdown_timeout: Duration,
    max_connections: usize,
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
        // First, before any descriptor is opened (fd 3 must be systemd's, not our epoll's).
        let inherited = systemd::inherited_listener()?;
        let poll = Poll::new()?;
        let socket_activated = inherited.is_some();
        let mut listener = match inherited {
            Some(socket) => Listener::adopt(socket)?,
            None => Listener::bind(SocketAddr::new(config.host, config.port))?,
        };
        poll.registry()
            .register(listener.socket_mut(), LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new(HANDLED_SIGNALS)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let (report_outbox, reports) = mailbox(poll.registry())?;
        let epoch = Instant::now();
        let mut workers = Vec::new();
        for index in 0..config.workers.resolve() {
            let worker_poll = Poll::new()?;
            let (outbox, inbox) = mailbox(worker_poll.registry())?;
            let stats = Arc::new(WorkerStats::default());
            workers.push(WorkerSlot {
                outbox,
                stats: stats.clone(),
                handed: 0,
                needs_wake: false,
                state: WorkerState::Starting,
                setup: Some(Setup {
                    index,
                    poll: worker_poll,
                    inbox,
                    reports: report_outbox.clone(),
                    stats,
                    epoch,
                }),
            });
        }
        Ok(Supervisor {
            poll,
            addr: listener.addr(),
            listener: Some(listener),
            accept_paused: false,
            accept_exhausted: false,
            over_limit: false,
            signals,
            reports,
            workers,
            next_worker: 0,
            handed: 0,
            closed_seen: 0,
            timers: Timers::new(),
            phase: Phase::Serving,
            now: epoch,
            epoch,
            shutdown_timeout: config.shutdown_timeout,
            max_connections: config.max_connections,
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

    /// Starts the workers, then runs the loop until the phase is `Stopped`; returns how to exit.
    pub fn run(mut self) -> Exit {
        if let Err(e) = self.spawn_workers() {
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
        info!(self.log, "starting server"; "addr" => %self.addr, "env" => self.env.as_str(),
              "workers" => self.workers.len());
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
            let timeout = self.timers.timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                error!(self.log, "poll failed"; "error" => %e);
                return Exit::Forced;
            }
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready(),
                    SIGNALS => self.on_signals(),
                    WAKER => self.on_reports(),
                    _ => {}
                }
            }
            self.expire_timers();
        }
    }

    /// One named thread per worker (`worker-0` ..), each running its own loop.
    fn spawn_workers(&mut self) -> io::Result<()> {
        for slot in &mut self.workers {
            let Some(setup) = slot.setup.take() else {
                continue;
            };
            let index = setup.index;
            let farewell = Farewell {
                index,
                reports: setup.reports.clone(),
                said: false,
            };
            let config = self.config.clone();
            let log = self.log.clone();
            thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    let mut farewell = farewell;
                    let exit = Worker::new(setup, &config, &log).run();
                    farewell.say(Report::Stopped {
                        worker: index,
                        exit,
                    });
                })?;
        }
        Ok(())
    }

    /// Waits until every worker's loop runs; false (logged) if one ended or none came in time.
    fn await_workers(&mut self) -> bool {
        let give_up = Instant::now() + START_TIMEOUT;
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while self
            .workers
            .iter()
            .any(|slot| slot.state == WorkerState::Starting)
        {
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
                match report {
                    Report::Ready(index) => {
                        if let Some(slot) = self.workers.get_mut(index) {
                            slot.state = WorkerState::Serving;
                        }
                    }
                    Report::Stopped { worker, .. } | Report::Gone(worker) => {
                        crit!(self.log, "worker stopped unexpectedly"; "worker" => worker);
                        return false;
                    }
                    Report::Open { .. } | Report::Dumped(_) => {}
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

    /// Accepts until the queue is empty (edge-triggered: one event may stand for many), deals
    /// the connections out, then wakes each worker that got one: one wake-up per batch.
    fn accept_ready(&mut self) {
        if self.accept_paused {
            return;
        }
        while let Some(listener) = &self.listener {
            match listener.accept() {
                Accept::Conn(stream, peer) => {
                    if self.accept_exhausted {
                        info!(self.log, "accepting again"; "connections" => self.open_connections());
                        self.accept_exhausted = false;
                    }
                    self.hand_off(stream, peer);
                }
                Accept::Empty => break,
                Accept::Exhausted(e) => {
                    if !self.accept_exhausted {
                        warn!(self.log, "cannot accept, pausing until descriptors free up"; "error" => %e,
                              "retry_ms" => ACCEPT_PAUSE.as_millis() as u64, "connections" => self.open_connections());
                        self.accept_exhausted = true;
                    }
                    self.accept_paused = true;
                    let resume = self.now + ACCEPT_PAUSE;
                    self.timers
                        .reschedule(Timer::AcceptResume, None, Some(resume));
                    break;
                }
            }
        }
        for slot in self.workers.iter_mut().filter(|slot| slot.needs_wake) {
            slot.outbox.wake();
            slot.needs_wake = false;
        }
    }

    /// Gives an accepted connection to the next worker, or closes it when the process holds
    /// `--max-connections` already.
    fn hand_off(&mut self, stream: mio::net::TcpStream, peer: SocketAddr) {
        if self.at_connection_limit() {
            if !self.over_limit {
                warn!(self.log, "max connections reached, closing new connections";
                      "max_connections" => self.max_connections);
                self.over_limit = true;
            }
            drop(stream);
            return;
        }
        if self.over_limit {
            info!(self.log, "below max connections again"; "connections" => self.open_connections());
            self.over_limit = false;
        }
        let index = self.next_worker % self.workers.len();
        self.next_worker = index + 1;
        let Some(slot) = self.workers.get_mut(index) else {
            return;
        };
        slot.outbox.queue(Command::Adopt(stream, peer));
        slot.handed += 1;
        slot.needs_wake = true;
        self.handed += 1;
    }

    /// The process holds `--max-connections`. Reads the workers' closed counts only when the
    /// bound kept here says the limit may be reached (once per `max_connections` accepts at most).
    fn at_connection_limit(&mut self) -> bool {
        let limit = self.max_connections as u64;
        if self.handed - self.closed_seen < limit {
            return false;
        }
        self.closed_seen = self.workers.iter().map(|slot| slot.stats.closed()).sum();
        self.handed - self.closed_seen >= limit
    }

    /// Connections open across the workers.
    fn open_connections(&self) -> usize {
        self.workers.iter().map(WorkerSlot::open).sum()
    }

    fn on_signals(&mut self) {
        let raw: Vec<libc::c_int> = self.signals.pending().collect();
        for signal in raw.into_iter().filter_map(Signal::from_raw) {
            match self.phase.on_signal(signal) {
                Transition::BeginDrain => self.begin_drain(signal),
                Transition::ForceStop => {
                    error!(self.log, "second signal while draining, forcing shutdown";
                           "signal" => signal.name(), "connections" => self.draining_connections());
                    self.force_stop();
                }
                Transition::DumpAndQuit => self.dump_and_quit(signal),
                Transition::Ignore => {}
            }
        }
    }

    /// Stop accepting (after dealing out what is queued: closing a listener resets its queue),
    /// then tell every worker to drain, with one deadline for the process.
    fn begin_drain(&mut self, signal: Signal) {
        let deadline = self.now + self.shutdown_timeout;
        // Our own listener: take what is queued, since closing it resets those connections.
        // systemd's: leave the queue to the next process (systemd keeps the socket open).
        if !self.socket_activated {
            self.accept_paused = false;
            self.accept_ready();
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(listener.socket_mut());
        }
        let open = self.open_connections();
        // Logged once the listener is closed: from this line on, new connections are refused.
        info!(self.log, "shutting down server"; "signal" => signal.name(),
              "connections" => open, "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
        self.phase = Phase::Draining { deadline };
        self.timers
            .reschedule(Timer::ShutdownDeadline, None, Some(deadline));
        self.tell_systemd(Notice::Stopping(&draining_status(open)));
        self.reported_draining = Some(open);
        // Each worker gets Drain after every connection dealt to it (one channel, in order).
        for slot in &mut self.workers {
            slot.state = WorkerState::Draining { open: None };
            slot.tell(Command::Drain);
        }
    }

    /// The deadline or a second signal: every worker closes everything now; exit 1.
    fn force_stop(&mut self) {
        for slot in &mut self.workers {
            if !matches!(slot.state, WorkerState::Stopped(_)) {
                slot.tell(Command::Force);
            }
        }
        self.end_after_answers(Exit::Forced);
    }

    /// SIGQUIT: every worker logs its connections; exit 2 without draining.
    fn dump_and_quit(&mut self, signal: Signal) {
        warn!(self.log, "dumping connection table and quitting without draining";
              "signal" => signal.name(), "connections" => self.open_connections());
        for slot in &mut self.workers {
            if !matches!(slot.state, WorkerState::Stopped(_)) {
                slot.tell(Command::Dump);
            }
        }
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
            match report {
                Report::Ready(_) => {}
                Report::Open { worker, open } => {
                    if let Some(slot) = self.workers.get_mut(worker)
                        && matches!(slot.state, WorkerState::Draining { .. })
                    {
                        slot.state = WorkerState::Draining { open: Some(open) };
                    }
                }
                Report::Dumped(worker) => {
                    if let Some(slot) = self.workers.get_mut(worker) {
                        slot.state = WorkerState::Dumped;
                    }
                }
                Report::Stopped { worker, exit } => {
                    let expected = !matches!(self.phase, Phase::Serving);
                    if let Some(slot) = self.workers.get_mut(worker) {
                        slot.state = WorkerState::Stopped(exit);
                    }
                    if !expected {
                        self.worker_lost(worker);
                    }
                }
                Report::Gone(worker) => {
                    if let Some(slot) = self.workers.get_mut(worker) {
                        slot.state = WorkerState::Stopped(Exit::Forced);
                    }
                    self.worker_lost(worker);
                }
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
              "connections" => self.open_connections());
        self.force_stop();
    }

    /// Moves the phase on once the workers have all answered what was asked of them.
    fn check_finished(&mut self) {
        let stopped = |state: &WorkerState| matches!(state, WorkerState::Stopped(_));
        match self.phase {
            Phase::Draining { .. } => {
                if self.workers.iter().all(|slot| stopped(&slot.state)) {
                    let clean = self
                        .workers
                        .iter()
                        .all(|slot| slot.state == WorkerState::Stopped(Exit::Clean));
                    if clean {
                        info!(self.log, "stopped server"; "addr" => %self.addr);
                        self.tell_systemd(Notice::Status("stopped"));
                        self.phase = Phase::Stopped(Exit::Clean);
                    } else {
                        self.phase = Phase::Stopped(Exit::Forced);
                    }
                } else {
                    let open = self.draining_connections();
                    if open > 0 && self.reported_draining != Some(open) {
                        self.reported_draining = Some(open);
                        self.tell_systemd(Notice::Status(&draining_status(open)));
                    }
                }
            }
            Phase::Ending(exit) => {
                let answered = |state: &WorkerState| match exit {
                    Exit::Quit => stopped(state) || *state == WorkerState::Dumped,
                    _ => stopped(state),
                };
                if self.workers.iter().all(|slot| answered(&slot.state)) {
                    self.phase = Phase::Stopped(exit);
                }
            }
            Phase::Serving | Phase::Stopped(_) => {}
        }
    }

    /// Connections still open while draining: each worker's last report, or its count
    /// before it reported.
    fn draining_connections(&self) -> usize {
        self.workers
            .iter()
            .map(|slot| match slot.state {
                WorkerState::Draining { open: Some(open) } => open,
                WorkerState::Stopped(_) => 0,
                _ => slot.open(),
            })
            .sum()
    }

    fn expire_timers(&mut self) {
        while let Some(key) = self.timers.pop_expired(self.now) {
            match key {
                Timer::ShutdownDeadline => {
                    if self.phase.drain_expired(self.now) {
                        error!(self.log, "shutdown deadline passed with connections still open, forcing them closed";
                               "connections" => self.draining_connections(),
                               "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
                        self.force_stop();
                    }
                }
                Timer::AcceptResume => {
                    self.accept_paused = false;
                    self.accept_ready();
                }
                Timer::Watchdog => self.feed_watchdog(),
                Timer::GiveUp => {
                    if let Phase::Ending(exit) = self.phase {
                        let silent: Vec<usize> = self
                            .workers
                            .iter()
                            .enumerate()
                            .filter(|(_, slot)| {
                                !matches!(slot.state, WorkerState::Stopped(_) | WorkerState::Dumped)
                            })
                            .map(|(index, _)| index)
                            .collect();
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
        let now_ms = millis_since(self.epoch, self.now);
        // A worker that has stopped (while draining) has nothing left to turn for.
        let beats = self.workers.iter().map(|slot| match slot.state {
            WorkerState::Stopped(_) => now_ms,
            _ => slot.stats.last_beat_ms(),
        });
        let stalled = stalled(beats, now_ms, STALL_LIMIT);
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

/// Sends the worker's last report when its thread ends: `Stopped` when its loop returned,
/// `Gone` if the thread unwinds without getting there.
struct Farewell {
    index: usize,
    reports: Outbox<Report>,
    said: bool,
}

impl Farewell {
    fn say(&mut self, report: Report) {
        self.reports.send(report);
        self.said = true;
    }
}

impl Drop for Farewell {
    fn drop(&mut self) {
        if !self.said {
            self.reports.send(Report::Gone(self.index));
        }
    }
}

/// The status line `systemctl status` shows while draining.
fn draining_status(open: usize) -> String {
    match open {
        1 => "draining 1 connection".to_string(),
        n => format!("draining {n} connections"),
    }
}
