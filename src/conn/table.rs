//! A loop's connections: the slab, their deadlines, the scratch buffers they borrow, and the one
//! close path. A worker holds one for the API; the supervisor holds one for the admin listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;
use slog::{Logger, debug, info, warn};

use super::{Close, Connection, Context, Scratch, Timeouts, Wake};
use crate::app::App;
use crate::config::{Config, enabled};
use crate::http::{DateCache, Limits};
use crate::metrics::{CloseReason, LoopMetrics};
use crate::timers::Timers;

/// What every connection of a loop reads while it runs: the configuration, the application,
/// and the time and date of the current wake-up. Kept apart from the [`Table`] so both can be
/// borrowed at once.
pub struct Shared {
    /// This wake-up's time.
    pub now: Instant,
    date: DateCache,
    /// The application the loop's listener serves.
    pub app: App,
    limits: Limits,
    timeouts: Timeouts,
    /// Every response says `Connection: close` (the lame duck, an upgrade's grace).
    pub closing: bool,
    /// This loop's counters.
    pub metrics: Arc<LoopMetrics>,
}

impl Shared {
    /// The configuration's limits and timeouts, serving `app`, counting into `metrics`.
    pub fn new(app: App, config: &Config, metrics: Arc<LoopMetrics>) -> Shared {
        Shared {
            now: Instant::now(),
            date: DateCache::new(SystemTime::now()),
            app,
            limits: config.limits(),
            timeouts: Timeouts {
                read: enabled(config.read_timeout),
                idle: enabled(config.idle_timeout),
                write: enabled(config.write_timeout),
            },
            closing: false,
            metrics,
        }
    }

    /// A new wake-up: the time now, and the `Date` value if the second changed.
    pub fn tick(&mut self) {
        self.now = Instant::now();
        self.date.update(SystemTime::now());
    }

    /// What a connection sees while it runs.
    pub fn context(&self) -> Context<'_> {
        Context {
            now: self.now,
            date: self.date.value(),
            app: &self.app,
            limits: &self.limits,
            timeouts: &self.timeouts,
            metrics: &self.metrics,
            closing: self.closing,
        }
    }
}

/// A loop's connections, registered under tokens `first_token + key`.
pub struct Table {
    conns: Slab<Connection>,
    /// Keys closed during this batch of events, freed after it so no token is reused within
    /// one batch (a stale event must not reach a new connection).
    closed: Vec<usize>,
    deadlines: Timers<usize>,
    scratch: Scratch,
    next_id: u64,
    first_token: usize,
    /// The loop's counters: the open-connections gauges and closes are kept here.
    metrics: Arc<LoopMetrics>,
}

impl Table {
    /// An empty table whose connections use tokens from `first_token` on, counted in `metrics`.
    pub fn new(first_token: usize, metrics: Arc<LoopMetrics>) -> Table {
        Table {
            conns: Slab::new(),
            closed: Vec::new(),
            deadlines: Timers::new(),
            scratch: Scratch::default(),
            next_id: 0,
            first_token,
            metrics,
        }
    }

    /// The connection key a token names, if it is one of this table's.
    pub fn key_of(&self, token: Token) -> Option<usize> {
        token.0.checked_sub(self.first_token)
    }

    /// Connections held (closed ones included until the end of the batch).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// No connection is held.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections open (not closed during this batch).
    pub fn open(&self) -> usize {
        self.conns.iter().filter(|(_, c)| !c.is_closed()).count()
    }

    /// Takes a connection in: registers it for READABLE and files its first deadline. One that
    /// cannot be registered is logged, counted as closed by an error, and dropped.
    pub fn adopt(
        &mut self,
        registry: &Registry,
        mut stream: TcpStream,
        peer: SocketAddr,
        cx: &Context<'_>,
        log: &Logger,
    ) {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let token = Token(self.first_token + key);
        if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
            warn!(log, "cannot register connection"; "error" => %e, "peer" => %peer);
            self.metrics.closed(CloseReason::Error);
            return;
        }
        self.next_id += 1;
        let conn = entry.insert(Connection::new(self.next_id, stream, peer, cx));
        conn.counted_as = Some(conn.state());
        self.metrics.moved(None, conn.counted_as);
        debug!(log, "accepted"; conn.log_fields());
        let deadline = conn.deadline();
        conn.filed_deadline = deadline;
        self.deadlines.reschedule(key, None, deadline);
    }

    /// Readiness for the connection behind `token`.
    pub fn on_event(
        &mut self,
        registry: &Registry,
        event: &Event,
        cx: &Context<'_>,
        draining: bool,
        log: &Logger,
    ) {
        let Some(key) = self.key_of(event.token()) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.is_closed() {
            return;
        }
        if event.is_read_closed() || event.is_error() {
            conn.note_read_closed();
        }
        self.drive(registry, key, Wake::Io, cx, draining, log);
    }

    /// Lets a connection read, answer and write, then files its interest and deadline; while
    /// `draining`, an idle connection is closed.
    pub fn drive(
        &mut self,
        registry: &Registry,
        key: usize,
        wake: Wake,
        cx: &Context<'_>,
        draining: bool,
        log: &Logger,
    ) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.is_closed() {
            return;
        }
        let result = conn.drive(wake, &mut self.scratch, cx, log);
        let result = match result {
            Ok(()) if draining && conn.is_idle() && !conn.held_as_fresh(cx.now) => {
                Err(Close::Draining)
            }
            other => other,
        };
        if let Err(reason) = result {
            self.close(key, reason, log);
            return;
        }
        // The gauges move only when the state does: a keep-alive request answered within one
        // wake-up leaves the connection idle as it found it, and costs nothing here.
        let state = Some(conn.state());
        if state != conn.counted_as {
            self.metrics.moved(conn.counted_as, state);
            conn.counted_as = state;
        }
        let wanted = conn.wanted_interest();
        if wanted != conn.interest() {
            let token = Token(self.first_token + key);
            if let Err(e) = registry.reregister(conn.stream_mut(), token, wanted) {
                self.close(key, Close::Failed(e.kind()), log);
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
            self.deadlines
                .reschedule(key, conn.filed_deadline, deadline);
            conn.filed_deadline = deadline;
        }
    }

    /// Drives every connection with `wake` (the drain: read what is pending, close idle ones).
    pub fn drive_all(
        &mut self,
        registry: &Registry,
        wake: Wake,
        cx: &Context<'_>,
        draining: bool,
        log: &Logger,
    ) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.drive(registry, key, wake, cx, draining, log);
        }
    }

    /// The poll timeout this table asks for: time to its nearest deadline.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.deadlines.timeout(now)
    }

    /// Drives every connection whose deadline is due.
    pub fn expire(&mut self, registry: &Registry, cx: &Context<'_>, draining: bool, log: &Logger) {
        while let Some(key) = self.deadlines.pop_expired(cx.now) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.filed_deadline = None;
            }
            self.drive(registry, key, Wake::Timer, cx, draining, log);
        }
    }

    /// Closes a connection now; its slot is freed after the batch.
    pub fn close(&mut self, key: usize, reason: Close, log: &Logger) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.is_closed() {
            return;
        }
        // No deregister: dropping the stream (after the batch) closes the descriptor, which
        // takes it out of epoll; until then its events are skipped as closed.
        self.deadlines.reschedule(key, conn.filed_deadline, None);
        conn.filed_deadline = None;
        conn.mark_closed();
        self.metrics.moved(conn.counted_as.take(), None);
        self.metrics.closed(conn.close_reason(reason));
        debug!(log, "closed"; conn.log_fields(), "reason" => reason.as_str(), "served" => conn.served());
        self.closed.push(key);
    }

    /// Closes every connection with `reason`, and frees them.
    pub fn close_all(&mut self, reason: Close, log: &Logger) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, reason, log);
        }
        self.free_closed();
    }

    /// Frees the slots closed during the batch (dropping their sockets).
    pub fn free_closed(&mut self) {
        for key in self.closed.drain(..) {
            self.conns.try_remove(key);
        }
    }

    /// SIGQUIT: one log line per open connection, for finding what holds a stuck process.
    pub fn dump(&self, now: Instant, log: &Logger) {
        for (_, conn) in self.conns.iter().filter(|(_, conn)| !conn.is_closed()) {
            let row = conn.snapshot(now);
            info!(log, "connection"; "id" => row.id, "peer" => %row.peer, "state" => row.state,
                  "age" => format_args!("{:.3?}", row.age), "age_ms" => row.age.as_millis() as u64,
                  "bytes_in" => row.bytes_in, "bytes_out" => row.bytes_out);
        }
    }
}
