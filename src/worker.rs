//! One worker: a single-threaded `mio::Poll` loop that owns its connections, its deadlines and
//! its scratch buffers, takes connections and commands from its mailbox, and reports to the
//! supervisor. Nothing here is shared with another worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use slog::{Logger, debug, error, info, warn};

use crate::app::App;
use crate::config::{Config, enabled};
use crate::conn::{Close, Connection, Context, Scratch, Timeouts, Wake, interrupted};
use crate::http::{DateCache, Limits};
use crate::mailbox::{Command, HEARTBEAT_INTERVAL, Inbox, Outbox, Report, WAKER, WorkerStats};
use crate::shutdown::Exit;
use crate::timers::Timers;

/// Readiness events taken per `poll` call; more simply wait for the next call.
const EVENTS_CAPACITY: usize = 1024;

/// What a worker's deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Time to show the loop is turning ([`HEARTBEAT_INTERVAL`]).
    Heartbeat,
    /// A connection's nearest deadline (its read, idle, write or linger timeout, or a handler
    /// becoming ready); the connection itself knows which.
    Conn(usize),
}

/// A worker's phase. The process-wide phase (and the shutdown deadline) is the supervisor's;
/// a worker only knows whether it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Serving adopted connections. Leaves to `Draining` on [`Command::Drain`], `Stopped` on
    /// [`Command::Force`].
    Serving,
    /// Finishing in-flight requests. Leaves to `Stopped` when the last connection closes
    /// (clean) or on [`Command::Force`].
    Draining,
    /// The loop returns this exit. Terminal.
    Stopped(Exit),
}

/// Everything one worker's loop owns.
pub struct Worker {
    index: usize,
    poll: Poll,
    inbox: Inbox<Command>,
    reports: Outbox<Report>,
    stats: Arc<WorkerStats>,
    /// The process's epoch, for heartbeats in milliseconds.
    epoch: Instant,
    conns: Slab<Connection>,
    /// Keys closed during this batch of events, freed after it so no token is reused within
    /// one batch (a stale event must not reach a new connection).
    closed: Vec<usize>,
    timers: Timers<Timer>,
    phase: Phase,
    scratch: Scratch,
    shared: Shared,
    next_id: u64,
    /// The open count last reported while draining.
    reported_open: Option<usize>,
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

/// What the supervisor hands a worker when it creates it.
pub struct Setup {
    /// Index `0..N`, as in the thread name `worker-{index}` and the `worker` log field.
    pub index: usize,
    /// The worker's poll, with its mailbox's waker registered.
    pub poll: Poll,
    /// Commands from the supervisor.
    pub inbox: Inbox<Command>,
    /// Reports to the supervisor.
    pub reports: Outbox<Report>,
    /// This worker's figures.
    pub stats: Arc<WorkerStats>,
    /// The process's epoch.
    pub epoch: Instant,
}

impl Worker {
    /// A worker ready to run; its logger carries its index as `worker`.
    pub fn new(setup: Setup, config: &Config, log: &Logger) -> Worker {
        let now = Instant::now();
        setup.stats.beat(setup.epoch, now);
        Worker {
            index: setup.index,
            poll: setup.poll,
            inbox: setup.inbox,
            reports: setup.reports,
            stats: setup.stats,
            epoch: setup.epoch,
            conns: Slab::new(),
            closed: Vec::new(),
            timers: Timers::new(),
            phase: Phase::Serving,
            scratch: Scratch::default(),
            shared: Shared {
                now,
                date: DateCache::new(SystemTime::now()),
                app: App::new(config.env, config.healthcheck_delay),
                limits: config.limits(),
                timeouts: Timeouts {
                    read: enabled(config.read_timeout),
                    idle: enabled(config.idle_timeout),
                    write: enabled(config.write_timeout),
                },
            },
            next_id: 0,
            reported_open: None,
            log: log.new(slog::o!("worker" => setup.index)),
        }
    }

    /// Runs the loop until the worker stops, and returns how it ended.
    pub fn run(mut self) -> Exit {
        self.reports.send(Report::Ready(self.index));
        self.timers
            .reschedule(Timer::Heartbeat, None, Some(self.shared.now));
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
                    WAKER => self.on_commands(),
                    Token(key) => self.on_conn_event(key, event),
                }
            }
            self.expire_timers();
            self.free_closed();
            self.check_drained();
        }
    }

    fn on_commands(&mut self) {
        while let Some(command) = self.inbox.next() {
            match command {
                Command::Adopt(stream, peer) => self.adopt(stream, peer),
                Command::Drain => self.begin_drain(),
                Command::Force => {
                    self.force_close_all();
                    self.phase = Phase::Stopped(Exit::Forced);
                }
                Command::Dump => {
                    self.dump_connections();
                    self.reports.send(Report::Dumped(self.index));
                }
            }
        }
    }

    /// Takes a connection the supervisor accepted into the table.
    fn adopt(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)
        {
            warn!(self.log, "cannot register connection"; "error" => %e, "peer" => %peer);
            self.stats.add_closed(1);
            return;
        }
        self.next_id += 1;
        let cx = self.shared.context();
        let conn = entry.insert(Connection::new(self.next_id, stream, peer, &cx));
        debug!(self.log, "accepted"; conn.log_fields());
        let deadline = conn.deadline();
        conn.filed_deadline = deadline;
        self.timers.reschedule(Timer::Conn(key), None, deadline);
        // Already draining (not expected: Drain follows every Adopt): treat it like the rest.
        if self.phase == Phase::Draining {
            self.drive(key, Wake::Drain);
        }
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
        let draining = self.phase == Phase::Draining;
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
                .reschedule(Timer::Conn(key), conn.filed_deadline, deadline);
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
            .reschedule(Timer::Conn(key), conn.filed_deadline, None);
        conn.filed_deadline = None;
        conn.mark_closed();
        debug!(self.log, "closed"; conn.log_fields(), "reason" => reason.as_str(), "served" => conn.served());
        self.closed.push(key);
    }

    fn free_closed(&mut self) {
        if self.closed.is_empty() {
            return;
        }
        let mut freed = 0;
        for key in self.closed.drain(..) {
            if self.conns.try_remove(key).is_some() {
                freed += 1;
            }
        }
        self.stats.add_closed(freed);
    }

    /// Read what every connection has pending, close the idle ones, let the active ones finish.
    fn begin_drain(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        self.phase = Phase::Draining;
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.drive(key, Wake::Drain);
        }
    }

    fn expire_timers(&mut self) {
        while let Some(key) = self.timers.pop_expired(self.shared.now) {
            match key {
                Timer::Heartbeat => {
                    self.stats.beat(self.epoch, self.shared.now);
                    let next = self.shared.now + HEARTBEAT_INTERVAL;
                    self.timers.reschedule(Timer::Heartbeat, None, Some(next));
                }
                Timer::Conn(key) => {
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.filed_deadline = None;
                    }
                    self.drive(key, Wake::Timer);
                }
            }
        }
    }

    /// While draining: report the open count when it changes; stop once it is zero, in the
    /// same iteration as the last close (no polling interval).
    fn check_drained(&mut self) {
        if self.phase != Phase::Draining {
            return;
        }
        let open = self.conns.len();
        if self.reported_open != Some(open) {
            self.reported_open = Some(open);
            self.reports.send(Report::Open {
                worker: self.index,
                open,
            });
        }
        if open == 0 {
            self.phase = Phase::Stopped(Exit::Clean);
        }
    }

    fn force_close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, Close::Forced);
        }
        self.free_closed();
    }

    /// SIGQUIT: one log line per connection, for finding what holds a stuck process.
    fn dump_connections(&self) {
        for (_, conn) in self.conns.iter().filter(|(_, conn)| !conn.is_closed()) {
            let row = conn.snapshot(Instant::now());
            info!(self.log, "connection"; "id" => row.id, "peer" => %row.peer, "state" => row.state,
                  "age" => format_args!("{:.3?}", row.age), "age_ms" => row.age.as_millis() as u64,
                  "bytes_in" => row.bytes_in, "bytes_out" => row.bytes_out);
        }
    }
}
