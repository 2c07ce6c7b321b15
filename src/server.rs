//! The event loop, and only the loop: one `mio::Poll` owns the listener, the connections and
//! the signal pipe; the nearest deadline is the poll timeout; the phase decides when it ends.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use mio::event::Event;
use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use slog::{Logger, debug, error, info, warn};

use crate::app::App;
use crate::config::{Config, Environment, enabled};
use crate::conn::{Close, Connection, Context, Scratch, Timeouts, Wake, interrupted};
use crate::http::{DateCache, Limits};
use crate::listener::{ACCEPT_PAUSE, Accept, Listener};
use crate::shutdown::{Exit, HANDLED_SIGNALS, Phase, Signal, Transition};
use crate::systemd::{self, Notice};
use crate::timers::{TimerKey, Timers};

/// Readiness events taken per `poll` call; more simply wait for the next call.
const EVENTS_CAPACITY: usize = 1024;

/// The listener's token (connections use their slab keys, far below).
const LISTENER: Token = Token(usize::MAX - 1);

/// The signal pipe's token.
const SIGNALS: Token = Token(usize::MAX - 2);

/// The server: everything the loop owns.
pub struct Server {
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
    conns: Slab<Connection>,
    /// Keys closed during this batch of events, freed after it so no token is reused within
    /// one batch (a stale event must not reach a new connection).
    closed: Vec<usize>,
    timers: Timers,
    phase: Phase,
    scratch: Scratch,
    shared: Shared,
    shutdown_timeout: Duration,
    max_connections: usize,
    next_id: u64,
    addr: SocketAddr,
    /// The listener came from systemd (socket activation), not from `--host`/`--port`.
    socket_activated: bool,
    /// Half of systemd's `WatchdogSec=`, when it is set for this process.
    watchdog: Option<Duration>,
    /// The connection count last reported to systemd while draining.
    reported_draining: Option<usize>,
    env: Environment,
    log: Logger,
}

/// What every connection reads while it runs: the fixed configuration, and the time and
/// date of the current wake-up. Kept apart from the connections so both can be borrowed at once.
struct Shared {
    now: Instant,
    date: DateCache,
    app: App,
    limits: Limits,
    timeouts: Timeouts,
}

impl Shared {
    fn context(&self) -> Context<'_> {
        Context {
            now: self.now,
            date: self.date.value(),
            app: &self.app,
            limits: &self.limits,
            timeouts: &self.timeouts,
        }
    }
}

impl Server {
    /// Binds the listener and installs the signal handlers; after this a signal is handled
    /// gracefully, so only then is `starting server` logged (by [`Server::run`]).
    pub fn bind(config: &Config, log: Logger) -> io::Result<Server> {
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
        Ok(Server {
            poll,
            addr: listener.addr(),
            listener: Some(listener),
            accept_paused: false,
            accept_exhausted: false,
            over_limit: false,
            signals,
            conns: Slab::new(),
            closed: Vec::new(),
            timers: Timers::new(),
            phase: Phase::Serving,
            scratch: Scratch::default(),
            shared: Shared {
                now: Instant::now(),
                date: DateCache::new(SystemTime::now()),
                app: App::new(config.env, config.healthcheck_delay),
                limits: config.limits(),
                timeouts: Timeouts {
                    read: enabled(config.read_timeout),
                    idle: enabled(config.idle_timeout),
                    write: enabled(config.write_timeout),
                },
            },
            shutdown_timeout: config.shutdown_timeout,
            max_connections: config.max_connections,
            next_id: 0,
            socket_activated,
            watchdog: systemd::watchdog_interval(),
            reported_draining: None,
            env: config.env,
            log,
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs the loop until the phase is `Stopped`, and returns how to exit.
    pub fn run(mut self) -> Exit {
        if self.socket_activated {
            info!(self.log, "using the listening socket passed by systemd; --host and --port are ignored";
                  "addr" => %self.addr);
        }
        info!(self.log, "starting server"; "addr" => %self.addr, "env" => self.env.as_str());
        self.tell_systemd(Notice::Ready(&format!("serving on {}", self.addr)));
        if let Some(interval) = self.watchdog {
            self.tell_systemd(Notice::Watchdog);
            self.timers
                .reschedule(TimerKey::Watchdog, None, Some(Instant::now() + interval));
        }
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
            self.shared.now = Instant::now();
            self.shared.date.update(SystemTime::now());
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready(),
                    SIGNALS => self.on_signals(),
                    Token(key) => self.on_conn_event(key, event),
                }
            }
            self.expire_timers();
            self.free_closed();
            self.check_drained();
        }
    }

    /// Sends a notice to systemd (nothing happens outside it); a failure is logged, not fatal.
    fn tell_systemd(&self, notice: Notice<'_>) {
        if let Err(e) = systemd::notify(notice) {
            warn!(self.log, "cannot notify systemd"; "error" => %e);
        }
    }

    /// Accepts until the queue is empty (edge-triggered: one event may stand for many).
    fn accept_ready(&mut self) {
        if self.accept_paused {
            return;
        }
        while let Some(listener) = &self.listener {
            match listener.accept() {
                Accept::Conn(stream, peer) => {
                    if self.accept_exhausted {
                        info!(self.log, "accepting again"; "connections" => self.conns.len());
                        self.accept_exhausted = false;
                    }
                    self.admit(stream, peer);
                }
                Accept::Empty => return,
                Accept::Exhausted(e) => {
                    if !self.accept_exhausted {
                        warn!(self.log, "cannot accept, pausing until descriptors free up"; "error" => %e,
                              "retry_ms" => ACCEPT_PAUSE.as_millis() as u64, "connections" => self.conns.len());
                        self.accept_exhausted = true;
                    }
                    self.accept_paused = true;
                    let resume = self.shared.now + ACCEPT_PAUSE;
                    self.timers
                        .reschedule(TimerKey::AcceptResume, None, Some(resume));
                    return;
                }
            }
        }
    }

    /// Takes an accepted stream into the connection table, or closes it when the table is full.
    fn admit(&mut self, mut stream: mio::net::TcpStream, peer: SocketAddr) {
        if self.conns.len() >= self.max_connections {
            if !self.over_limit {
                warn!(self.log, "max connections reached, closing new connections";
                      "max_connections" => self.max_connections);
                self.over_limit = true;
            }
            drop(stream);
            return;
        }
        if self.over_limit {
            info!(self.log, "below max connections again"; "connections" => self.conns.len());
            self.over_limit = false;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)
        {
            warn!(self.log, "cannot register connection"; "error" => %e, "peer" => %peer);
            return;
        }
        self.next_id += 1;
        let cx = self.shared.context();
        let conn = entry.insert(Connection::new(self.next_id, stream, peer, &cx));
        debug!(self.log, "accepted"; conn.log_fields());
        let deadline = conn.deadline();
        conn.filed_deadline = deadline;
        self.timers.reschedule(TimerKey::Conn(key), None, deadline);
    }

    fn on_conn_event(&mut self, key: usize, event: &Event) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.is_closed() {
            return;
        }
        if event.is_read_closed() || event.is_error() {
            conn.note_read_closed();
        }
        self.drive(key, Wake::Io);
    }

    /// Lets a connection read, answer and write, then files its interest and deadline.
    fn drive(&mut self, key: usize, wake: Wake) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.is_closed() {
            return;
        }
        let cx = self.shared.context();
        let result = conn.drive(wake, &mut self.scratch, &cx, &self.log);
        self.settle(key, result);
    }

    /// After a connection ran: close it, or register what it now waits for.
    fn settle(&mut self, key: usize, result: Result<(), Close>) {
        let draining = self.phase.is_draining();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let result = match result {
            Ok(()) if draining && conn.is_idle() && !conn.held_as_fresh(self.shared.now) => {
                Err(Close::Draining)
            }
            other => other,
        };
        if let Err(reason) = result {
            self.close(key, reason);
            return;
        }
        let wanted = conn.wanted_interest();
        if wanted != conn.interest() {
            if let Err(e) = self
                .poll
                .registry()
                .reregister(conn.stream_mut(), Token(key), wanted)
            {
                self.close(key, Close::Failed(e.kind()));
                return;
            }
            conn.set_interest(wanted);
        }
        // File the deadline only when it moves earlier: a later one (the idle deadline after
        // each keep-alive response) would cost a remove and an insert per request, while an
        // early wake-up costs one spurious drive, which refiles the real deadline.
        let deadline = conn.deadline();
        let earlier = match (conn.filed_deadline, deadline) {
            (None, Some(_)) => true,
            (Some(filed), Some(new)) => new < filed,
            (_, None) => false,
        };
        if earlier {
            self.timers
                .reschedule(TimerKey::Conn(key), conn.filed_deadline, deadline);
            conn.filed_deadline = deadline;
        }
    }

    /// Closes a connection now; its slab slot is freed after the batch.
    fn close(&mut self, key: usize, reason: Close) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.is_closed() {
            return;
        }
        // No deregister: dropping the stream (after the batch) closes the descriptor, which
        // takes it out of epoll; until then its events are skipped as closed.
        self.timers
            .reschedule(TimerKey::Conn(key), conn.filed_deadline, None);
        conn.filed_deadline = None;
        conn.mark_closed();
        debug!(self.log, "closed"; conn.log_fields(), "reason" => reason.as_str(), "served" => conn.served());
        self.closed.push(key);
    }

    fn free_closed(&mut self) {
        for key in self.closed.drain(..) {
            if self.conns.contains(key) {
                self.conns.remove(key);
            }
        }
    }

    fn on_signals(&mut self) {
        let raw: Vec<libc::c_int> = self.signals.pending().collect();
        for signal in raw.into_iter().filter_map(Signal::from_raw) {
            match self.phase.on_signal(signal) {
                Transition::BeginDrain => self.begin_drain(signal),
                Transition::ForceStop => {
                    error!(self.log, "second signal while draining, forcing shutdown";
                           "signal" => signal.name(), "connections" => self.open_connections());
                    self.force_close_all();
                    self.phase = Phase::Stopped(Exit::Forced);
                }
                Transition::DumpAndQuit => {
                    self.dump_connections(signal);
                    self.phase = Phase::Stopped(Exit::Quit);
                }
                Transition::Ignore => {}
            }
        }
    }

    /// Stop accepting (after taking what is queued: closing a listener resets its queue), read
    /// what every connection has pending, close the idle ones, let the active ones finish.
    fn begin_drain(&mut self, signal: Signal) {
        let deadline = self.shared.now + self.shutdown_timeout;
        // Our own listener: take what is queued, since closing it resets those connections.
        // systemd's: leave the queue to the next process (systemd keeps the socket open).
        if !self.socket_activated {
            self.accept_paused = false;
            self.accept_ready();
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(listener.socket_mut());
        }
        // Logged once the listener is closed: from this line on, new connections are refused.
        info!(self.log, "shutting down server"; "signal" => signal.name(),
              "connections" => self.open_connections(),
              "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
        self.phase = Phase::Draining { deadline };
        self.timers
            .reschedule(TimerKey::ShutdownDeadline, None, Some(deadline));
        let open = self.open_connections();
        self.tell_systemd(Notice::Stopping(&draining_status(open)));
        self.reported_draining = Some(open);

        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.drive(key, Wake::Drain);
        }
    }

    fn expire_timers(&mut self) {
        while let Some(key) = self.timers.pop_expired(self.shared.now) {
            match key {
                TimerKey::ShutdownDeadline => {
                    if self.phase.drain_expired(self.shared.now) {
                        error!(self.log, "shutdown deadline passed with connections still open, forcing them closed";
                               "connections" => self.open_connections(),
                               "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
                        self.force_close_all();
                        self.phase = Phase::Stopped(Exit::Forced);
                    }
                }
                TimerKey::AcceptResume => {
                    self.accept_paused = false;
                    self.accept_ready();
                }
                TimerKey::Watchdog => {
                    if let Some(interval) = self.watchdog {
                        self.tell_systemd(Notice::Watchdog);
                        self.timers.reschedule(
                            TimerKey::Watchdog,
                            None,
                            Some(self.shared.now + interval),
                        );
                    }
                }
                TimerKey::Conn(key) => {
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.filed_deadline = None;
                    }
                    self.drive(key, Wake::Timer);
                }
            }
        }
    }

    /// The drain is over when the last connection has closed: exit at once, no polling interval.
    fn check_drained(&mut self) {
        if !self.phase.is_draining() {
            return;
        }
        if self.conns.is_empty() {
            info!(self.log, "stopped server"; "addr" => %self.addr);
            self.tell_systemd(Notice::Status("stopped"));
            self.phase = Phase::Stopped(Exit::Clean);
        } else if self.reported_draining != Some(self.conns.len()) {
            self.reported_draining = Some(self.conns.len());
            self.tell_systemd(Notice::Status(&draining_status(self.conns.len())));
        }
    }

    fn force_close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, Close::Forced);
        }
    }

    fn open_connections(&self) -> usize {
        self.conns
            .iter()
            .filter(|(_, conn)| !conn.is_closed())
            .count()
    }

    /// SIGQUIT: one log line per connection, for finding what holds a stuck process.
    fn dump_connections(&self, signal: Signal) {
        warn!(self.log, "dumping connection table and quitting without draining";
              "signal" => signal.name(), "connections" => self.open_connections());
        for (_, conn) in self.conns.iter().filter(|(_, conn)| !conn.is_closed()) {
            let row = conn.snapshot(self.shared.now);
            info!(self.log, "connection"; "id" => row.id, "peer" => %row.peer, "state" => row.state,
                  "age" => format_args!("{:.3?}", row.age), "age_ms" => row.age.as_millis() as u64, "bytes_in" => row.bytes_in, "bytes_out" => row.bytes_out);
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
