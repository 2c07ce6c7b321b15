//! The supervisor's view of its workers: their threads, mailboxes and states, the round-robin
//! deal of accepted connections, and the sums it needs (open connections, who has answered,
//! whose loop has stalled).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::Poll;
use mio::net::TcpStream;
use slog::{Logger, info, warn};

use crate::config::Config;
use crate::mailbox::{Command, Outbox, Report, WorkerStats, mailbox, stalled};
use crate::metrics::LoopMetrics;
use crate::shutdown::Exit;
use crate::worker::{Setup, Worker};

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
    /// Its loop returned, or its thread ended. Terminal.
    Stopped(Exit),
}

/// The supervisor's handle on one worker.
struct Slot {
    outbox: Outbox<Command>,
    stats: Arc<WorkerStats>,
    metrics: Arc<LoopMetrics>,
    /// Connections handed to it, ever.
    handed: u64,
    /// Connections were queued for it since its last wake-up.
    needs_wake: bool,
    state: WorkerState,
    /// Its setup, until its thread is spawned.
    setup: Option<Setup>,
}

impl Slot {
    /// Connections open in this worker: handed minus closed (may count a few just closing).
    fn open(&self) -> usize {
        self.handed.saturating_sub(self.metrics.closed_total()) as usize
    }

    fn is_stopped(&self) -> bool {
        matches!(self.state, WorkerState::Stopped(_))
    }
}

/// A worker's thread ended: how the supervisor learns it (see [`Crew::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Worker index.
    pub worker: usize,
    /// How its loop ended (`Forced` if its thread unwound).
    pub exit: Exit,
}

/// Every worker of the process.
pub struct Crew {
    slots: Vec<Slot>,
    /// The worker the next connection goes to (round-robin).
    next: usize,
    /// Connections handed out, ever, and the workers' closed total last read: their
    /// difference bounds the open count from above without reading every worker per accept.
    handed: u64,
    closed_seen: u64,
    /// `--max-connections` in force, for the whole process.
    max_connections: usize,
    /// A connection over the cap was refused and not yet logged as recovered.
    over_limit: bool,
    /// Connections accepted, ever (those over the cap included).
    accepted: u64,
    /// Connections closed at once for being over the cap, ever.
    refused: u64,
}

impl Crew {
    /// Prepares `count` workers: a poll and a mailbox each; their threads start in [`Crew::spawn`].
    pub fn prepare(
        count: usize,
        max_connections: usize,
        reports: &Outbox<Report>,
        epoch: Instant,
    ) -> io::Result<Crew> {
        let mut slots = Vec::with_capacity(count);
        for index in 0..count {
            let poll = Poll::new()?;
            let (outbox, inbox) = mailbox(poll.registry())?;
            let stats = Arc::new(WorkerStats::default());
            let metrics = Arc::new(LoopMetrics::default());
            slots.push(Slot {
                outbox,
                stats: stats.clone(),
                metrics: metrics.clone(),
                handed: 0,
                needs_wake: false,
                state: WorkerState::Starting,
                setup: Some(Setup {
                    index,
                    poll,
                    inbox,
                    reports: reports.clone(),
                    stats,
                    metrics,
                    epoch,
                }),
            });
        }
        Ok(Crew {
            slots,
            next: 0,
            handed: 0,
            closed_seen: 0,
            max_connections,
            over_limit: false,
            accepted: 0,
            refused: 0,
        })
    }

    /// Starts one named thread per worker (`worker-0` ..), each running its own loop.
    pub fn spawn(&mut self, config: &Config, log: &Logger) -> io::Result<()> {
        for slot in &mut self.slots {
            let Some(setup) = slot.setup.take() else {
                continue;
            };
            let index = setup.index;
            let farewell = Farewell {
                index,
                reports: setup.reports.clone(),
                said: false,
            };
            let config = config.clone();
            let log = log.clone();
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

    /// Every worker's metrics, in index order (for the admin listener's scrapes).
    pub fn metrics(&self) -> Vec<Arc<LoopMetrics>> {
        self.slots.iter().map(|slot| slot.metrics.clone()).collect()
    }

    /// `--max-connections` in force for the process.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Connections accepted, ever, and of those closed at once for being over the cap.
    pub fn accept_counts(&self) -> (u64, u64) {
        (self.accepted, self.refused)
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// There are no workers (never, once prepared with a count of at least one).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Some worker has not reported `Ready` yet.
    pub fn is_starting(&self) -> bool {
        self.slots
            .iter()
            .any(|slot| slot.state == WorkerState::Starting)
    }

    /// Deals an accepted connection to the next worker, or closes it at once when the process
    /// holds `--max-connections` already (logged once per episode).
    pub fn admit(&mut self, stream: TcpStream, peer: SocketAddr, log: &Logger) {
        self.accepted += 1;
        if self.at_limit(self.max_connections) {
            self.refused += 1;
            if !self.over_limit {
                warn!(log, "max connections reached, closing new connections";
                      "max_connections" => self.max_connections);
                self.over_limit = true;
            }
            drop(stream);
            return;
        }
        if self.over_limit {
            info!(log, "below max connections again"; "connections" => self.open());
            self.over_limit = false;
        }
        self.deal(stream, peer);
    }

    /// Queues a connection for the next worker in turn; [`Crew::wake_dealt`] wakes them.
    pub fn deal(&mut self, stream: TcpStream, peer: SocketAddr) {
        let index = self.next % self.slots.len().max(1);
        self.next = index + 1;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        slot.outbox.queue(Command::Adopt(stream, peer));
        slot.handed += 1;
        slot.needs_wake = true;
        self.handed += 1;
    }

    /// Wakes each worker that was dealt a connection since its last wake-up: one wake-up per
    /// worker per accepted batch.
    pub fn wake_dealt(&mut self) {
        for slot in self.slots.iter_mut().filter(|slot| slot.needs_wake) {
            slot.outbox.wake();
            slot.needs_wake = false;
        }
    }

    /// The process holds `limit` connections. Reads the workers' closed counts only when the
    /// bound kept here says the limit may be reached (once per `limit` accepts at most).
    pub fn at_limit(&mut self, limit: usize) -> bool {
        let limit = limit as u64;
        if self.handed - self.closed_seen < limit {
            return false;
        }
        self.closed_seen = self
            .slots
            .iter()
            .map(|slot| slot.metrics.closed_total())
            .sum();
        self.handed - self.closed_seen >= limit
    }

    /// Connections open across the workers.
    pub fn open(&self) -> usize {
        self.slots.iter().map(Slot::open).sum()
    }

    /// Connections still open while draining: each worker's last report, or its count
    /// before it reported.
    pub fn draining_open(&self) -> usize {
        self.slots
            .iter()
            .map(|slot| match slot.state {
                WorkerState::Draining { open: Some(open) } => open,
                WorkerState::Stopped(_) => 0,
                _ => slot.open(),
            })
            .sum()
    }

    /// Tells every worker to drain (after every connection dealt to it: one channel, in order).
    pub fn drain(&mut self) {
        for slot in self.slots.iter_mut().filter(|slot| !slot.is_stopped()) {
            slot.state = WorkerState::Draining { open: None };
            slot.outbox.send(Command::Drain);
            slot.needs_wake = false;
        }
    }

    /// Tells every running worker `command()` (`Force` or `Dump`).
    pub fn tell_all(&mut self, command: impl Fn() -> Command) {
        for slot in self.slots.iter_mut().filter(|slot| !slot.is_stopped()) {
            slot.outbox.send(command());
            slot.needs_wake = false;
        }
    }

    /// Takes in a report; returns the worker whose thread ended, if this says one did.
    pub fn apply(&mut self, report: Report) -> Option<Ended> {
        let (index, state) = match report {
            Report::Ready(worker) => (worker, WorkerState::Serving),
            Report::Open { worker, open } => (worker, WorkerState::Draining { open: Some(open) }),
            Report::Dumped(worker) => (worker, WorkerState::Dumped),
            Report::Stopped { worker, exit } => (worker, WorkerState::Stopped(exit)),
            Report::Gone(worker) => (worker, WorkerState::Stopped(Exit::Forced)),
        };
        let slot = self.slots.get_mut(index)?;
        match (slot.state, state) {
            // A stopped worker stays stopped; an open count means nothing outside a drain.
            (WorkerState::Stopped(_), _) => return None,
            (WorkerState::Draining { .. }, WorkerState::Draining { .. }) => slot.state = state,
            (_, WorkerState::Draining { .. }) => {}
            _ => slot.state = state,
        }
        match state {
            WorkerState::Stopped(exit) => Some(Ended {
                worker: index,
                exit,
            }),
            _ => None,
        }
    }

    /// Every worker's loop has returned.
    pub fn all_stopped(&self) -> bool {
        self.slots.iter().all(Slot::is_stopped)
    }

    /// Every worker's loop has returned after draining cleanly.
    pub fn all_clean(&self) -> bool {
        self.slots
            .iter()
            .all(|slot| slot.state == WorkerState::Stopped(Exit::Clean))
    }

    /// Every worker has answered a dump (or stopped).
    pub fn all_dumped(&self) -> bool {
        self.slots
            .iter()
            .all(|slot| slot.is_stopped() || slot.state == WorkerState::Dumped)
    }

    /// The workers that have answered neither a dump nor a stop.
    pub fn silent(&self) -> Vec<usize> {
        self.indices(|slot| !slot.is_stopped() && slot.state != WorkerState::Dumped)
    }

    /// The running workers whose loop has not turned within `limit` at `now_ms` (a stopped
    /// worker has nothing left to turn for).
    pub fn stalled(&self, now_ms: u64, limit: Duration) -> Vec<usize> {
        let beats = self.slots.iter().map(|slot| match slot.state {
            WorkerState::Stopped(_) => now_ms,
            _ => slot.stats.last_beat_ms(),
        });
        stalled(beats, now_ms, limit)
    }

    /// A sender of reports, as the workers have (tests pose as a worker with it).
    #[cfg(test)]
    pub fn report_outbox(&self) -> Option<Outbox<Report>> {
        self.slots
            .iter()
            .find_map(|slot| slot.setup.as_ref().map(|setup| setup.reports.clone()))
    }

    fn indices(&self, keep: impl Fn(&Slot) -> bool) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| keep(slot))
            .map(|(index, _)| index)
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::CloseReason;

    fn crew(count: usize) -> (Crew, crate::mailbox::Inbox<Report>, Poll) {
        let poll = Poll::new().unwrap();
        let (reports, inbox) = mailbox(poll.registry()).unwrap();
        (
            Crew::prepare(count, 100, &reports, Instant::now()).unwrap(),
            inbox,
            poll,
        )
    }

    #[test]
    fn a_thread_that_unwinds_reports_gone() {
        let poll = Poll::new().unwrap();
        let (reports, inbox) = mailbox::<Report>(poll.registry()).unwrap();
        let farewell = Farewell {
            index: 3,
            reports,
            said: false,
        };
        let joined = thread::spawn(move || {
            let _farewell = farewell;
            std::panic::resume_unwind(Box::new("a worker bug"));
        })
        .join();
        assert!(joined.is_err());
        assert_eq!(inbox.next(), Some(Report::Gone(3)));
    }

    #[test]
    fn connections_are_dealt_round_robin() {
        let (mut crew, _inbox, _poll) = crew(3);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..7 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (stream, peer) = listener.accept().unwrap();
            crew.deal(TcpStream::from_std(stream), peer);
        }
        let handed: Vec<u64> = crew.slots.iter().map(|slot| slot.handed).collect();
        assert_eq!(handed, [3, 2, 2]);
        assert_eq!(crew.open(), 7);
        assert!(crew.at_limit(7));
        assert!(!crew.at_limit(8));
        crew.slots[1].metrics.closed(CloseReason::PeerClosed);
        crew.slots[1].metrics.closed(CloseReason::Drained);
        assert!(!crew.at_limit(7), "closed connections free room");
        assert_eq!(crew.open(), 5);
    }

    #[test]
    fn the_drain_is_over_when_every_worker_stopped_clean() {
        let (mut crew, _inbox, _poll) = crew(2);
        crew.apply(Report::Ready(0));
        crew.apply(Report::Ready(1));
        assert!(!crew.is_starting());
        crew.drain();
        crew.apply(Report::Open { worker: 0, open: 2 });
        assert_eq!(crew.draining_open(), 2);
        let ended = crew.apply(Report::Stopped {
            worker: 0,
            exit: Exit::Clean,
        });
        assert_eq!(
            ended,
            Some(Ended {
                worker: 0,
                exit: Exit::Clean
            })
        );
        assert!(!crew.all_stopped());
        crew.apply(Report::Gone(1));
        assert!(crew.all_stopped());
        assert!(
            !crew.all_clean(),
            "a worker that unwound is not a clean drain"
        );
    }
}
