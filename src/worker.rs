//! One worker: a single-threaded `mio::Poll` loop that owns its connections, its deadlines and
//! its scratch buffers, takes connections and commands from its mailbox, and reports to the
//! supervisor. Nothing here is shared with another worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Events, Poll};
use slog::{Logger, error};

use crate::app::App;
use crate::config::Config;
use crate::conn::{Close, Shared, Table, Wake, interrupted};
use crate::mailbox::{Command, HEARTBEAT_INTERVAL, Inbox, Outbox, Report, WAKER, WorkerStats};
use crate::metrics::LoopMetrics;
use crate::shutdown::Exit;

/// Readiness events taken per `poll` call; more simply wait for the next call.
const EVENTS_CAPACITY: usize = 1024;

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
    /// The API connections this worker serves.
    table: Table,
    /// When the loop next shows it is turning.
    next_beat: Instant,
    phase: Phase,
    shared: Shared,
    /// The open count last reported while draining.
    reported_open: Option<usize>,
    log: Logger,
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
    /// This worker's heartbeat and closed count.
    pub stats: Arc<WorkerStats>,
    /// This worker's request and connection metrics.
    pub metrics: Arc<LoopMetrics>,
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
            table: Table::new(0, setup.metrics.clone()),
            next_beat: now,
            phase: Phase::Serving,
            shared: Shared::new(
                App::api(config.env, config.healthcheck_delay),
                config,
                setup.metrics,
            ),
            reported_open: None,
            log: log.new(slog::o!("worker" => setup.index)),
        }
    }

    /// Runs the loop until the worker stops, and returns how it ended.
    pub fn run(mut self) -> Exit {
        self.reports.send(Report::Ready(self.index));
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            if let Phase::Stopped(exit) = self.phase {
                return exit;
            }
            let now = Instant::now();
            let beat = self.next_beat.saturating_duration_since(now);
            let timeout = self.table.timeout(now).map_or(beat, |t| t.min(beat));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if interrupted(&e) {
                    continue;
                }
                error!(self.log, "poll failed"; "error" => %e);
                return Exit::Forced;
            }
            self.shared.tick();
            let draining = self.phase == Phase::Draining;
            for event in events.iter() {
                if event.token() == WAKER {
                    self.on_commands();
                } else {
                    let cx = self.shared.context();
                    let registry = self.poll.registry();
                    self.table
                        .on_event(registry, event, &cx, draining, &self.log);
                }
            }
            self.expire_timers();
            self.table.free_closed();
            self.check_drained();
        }
    }

    fn on_commands(&mut self) {
        while let Some(command) = self.inbox.next() {
            match command {
                Command::Adopt(stream, peer) => self.adopt(stream, peer),
                Command::CloseEveryResponse => self.shared.closing = true,
                Command::Drain => self.begin_drain(),
                Command::Force => {
                    self.table.close_all(Close::Forced, &self.log);
                    self.phase = Phase::Stopped(Exit::Forced);
                }
                Command::Dump => {
                    self.table.dump(Instant::now(), &self.log);
                    self.reports.send(Report::Dumped(self.index));
                }
            }
        }
    }

    /// Takes a connection the supervisor accepted into the table.
    fn adopt(&mut self, stream: TcpStream, peer: SocketAddr) {
        let cx = self.shared.context();
        let registry = self.poll.registry();
        self.table.adopt(registry, stream, peer, &cx, &self.log);
    }

    /// Read what every connection has pending, close the idle ones, let the active ones finish.
    fn begin_drain(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        self.phase = Phase::Draining;
        let cx = self.shared.context();
        let registry = self.poll.registry();
        self.table
            .drive_all(registry, Wake::Drain, &cx, true, &self.log);
    }

    fn expire_timers(&mut self) {
        let now = self.shared.now;
        if self.next_beat <= now {
            self.stats.beat(self.epoch, now);
            self.next_beat = now + HEARTBEAT_INTERVAL;
        }
        let cx = self.shared.context();
        let registry = self.poll.registry();
        let draining = self.phase == Phase::Draining;
        self.table.expire(registry, &cx, draining, &self.log);
    }

    /// While draining: report the open count when it changes; stop once it is zero, in the
    /// same iteration as the last close (no polling interval).
    fn check_drained(&mut self) {
        if self.phase != Phase::Draining {
            return;
        }
        let open = self.table.len();
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
}
