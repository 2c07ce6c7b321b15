//! What crosses between the supervisor and the workers: commands down, reports up (each a
//! channel message plus a `mio::Waker` that wakes the receiving loop), and the per-worker
//! figures the supervisor reads without asking (heartbeat, connections closed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Registry, Token, Waker};

use crate::shutdown::Exit;

/// How often an idle worker's loop wakes to show it is turning. A busy loop beats on every
/// wake-up past this interval too (it is a timer like any other).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// A loop that has not turned for longer than this is stalled: systemd's watchdog is not fed
/// (so `WatchdogSec=` fires) and, with an admin listener, `/livez` says 503. Four heartbeats:
/// a loaded machine delays a timer by milliseconds, not by a second.
pub const STALL_LIMIT: Duration = Duration::from_secs(1);

/// The token of a loop's waker (connections use slab keys, far below).
pub const WAKER: Token = Token(usize::MAX - 3);

/// What the supervisor tells a worker.
#[derive(Debug)]
pub enum Command {
    /// Serve this connection, accepted by the supervisor.
    Adopt(TcpStream, SocketAddr),
    /// The lame duck (or an upgrade's grace) began: every response from now on says
    /// `Connection: close`, so clients move their keep-alive connections elsewhere; idle
    /// connections stay open (closing one just as a client reuses it loses that request).
    CloseEveryResponse,
    /// The drain began: read what is pending, close idle connections, finish the rest. Sent
    /// after every `Adopt` of a connection accepted before the listener closed.
    Drain,
    /// Close every connection now and stop (the deadline passed, or a second signal came).
    Force,
    /// Log one `connection` line per open connection (SIGQUIT), then report `Dumped`.
    Dump,
}

/// What a worker tells the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The worker's loop is running: it can take connections.
    Ready(usize),
    /// While draining: this many connections are still open in this worker.
    Open {
        /// Worker index.
        worker: usize,
        /// Its open connections.
        open: usize,
    },
    /// The connection table was logged.
    Dumped(usize),
    /// The worker's loop returned.
    Stopped {
        /// Worker index.
        worker: usize,
        /// How it ended: `Clean` once drained, `Forced` when told to or when its poll failed.
        exit: Exit,
    },
    /// The worker's thread ended without returning from its loop (a panic).
    Gone(usize),
}

/// One worker's heartbeat, which the supervisor reads without asking. One writer (its worker);
/// aligned to a cache line so no two workers' heartbeats share one (false sharing). (Its
/// connection counts are in its `metrics::LoopMetrics`.)
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    /// Milliseconds since the process epoch at the loop's last heartbeat.
    heartbeat_ms: AtomicU64,
}

impl WorkerStats {
    /// Records a heartbeat (written by the worker only).
    pub fn beat(&self, epoch: Instant, now: Instant) {
        self.heartbeat_ms
            .store(millis_since(epoch, now), Ordering::Relaxed);
    }

    /// The last heartbeat, in milliseconds since the process epoch.
    pub fn last_beat_ms(&self) -> u64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }
}

/// Milliseconds from `epoch` to `now` (0 if `now` is earlier).
pub fn millis_since(epoch: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(epoch).as_millis() as u64
}

/// The indices of the loops whose last heartbeat is older than `limit` at `now_ms`: the
/// aggregation behind the watchdog (fed only when this is empty) and `/livez`.
pub fn stalled(beats: impl Iterator<Item = u64>, now_ms: u64, limit: Duration) -> Vec<usize> {
    let limit_ms = limit.as_millis() as u64;
    beats
        .enumerate()
        .filter(|&(_, beat)| now_ms.saturating_sub(beat) > limit_ms)
        .map(|(index, _)| index)
        .collect()
}

/// The sending end of a mailbox: a message, then a wake-up of the loop that reads it.
#[derive(Debug)]
pub struct Outbox<T> {
    sender: Sender<T>,
    waker: Arc<Waker>,
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Outbox {
            sender: self.sender.clone(),
            waker: self.waker.clone(),
        }
    }
}

impl<T> Outbox<T> {
    /// Queues a message without waking the reader (for a batch; call [`Outbox::wake`] after).
    /// False if the reader is gone.
    pub fn queue(&self, message: T) -> bool {
        self.sender.send(message).is_ok()
    }

    /// Wakes the reader's loop.
    pub fn wake(&self) {
        // A failed wake-up means the reader's poll is gone: the process is ending.
        let _ = self.waker.wake();
    }

    /// Queues a message and wakes the reader.
    pub fn send(&self, message: T) -> bool {
        let queued = self.queue(message);
        self.wake();
        queued
    }
}

/// The receiving end: drained whenever the loop's [`WAKER`] token is ready.
#[derive(Debug)]
pub struct Inbox<T> {
    receiver: Receiver<T>,
    /// The reader keeps its own waker open: if the last sender closed it, epoll would drop the
    /// wake-up still pending on it (a worker's last report, sent just before its thread ends).
    _waker: Arc<Waker>,
}

impl<T> Inbox<T> {
    /// The next message, if one is queued.
    pub fn next(&self) -> Option<T> {
        // Empty, or every sender gone: nothing to read either way.
        self.receiver.try_recv().ok()
    }
}

/// A mailbox whose reader is the loop owning `registry`: its waker is registered there under
/// [`WAKER`].
pub fn mailbox<T>(registry: &Registry) -> std::io::Result<(Outbox<T>, Inbox<T>)> {
    let waker = Arc::new(Waker::new(registry, WAKER)?);
    let (sender, receiver) = channel();
    let inbox = Inbox {
        receiver,
        _waker: waker.clone(),
    };
    Ok((Outbox { sender, waker }, inbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stalled_only_past_the_limit() {
        let limit = Duration::from_secs(1);
        let beats = [10_000u64, 9_000, 8_999, 10_500];
        assert_eq!(stalled(beats.into_iter(), 10_000, limit), vec![2]);
        assert_eq!(
            stalled(beats.into_iter(), 9_999, limit),
            Vec::<usize>::new()
        );
        assert_eq!(stalled(beats.into_iter(), 11_600, limit), vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_watchdog_is_fed_only_while_every_worker_beats() {
        // Two workers, one stuck after its first beat: the aggregation must say so once the
        // stuck one falls a whole limit behind, however fresh the other is.
        let epoch = Instant::now();
        let stats = [WorkerStats::default(), WorkerStats::default()];
        stats[0].beat(epoch, epoch);
        stats[1].beat(epoch, epoch);
        let now = epoch + Duration::from_millis(900);
        stats[0].beat(epoch, now);
        let beats = || stats.iter().map(WorkerStats::last_beat_ms);
        assert!(stalled(beats(), millis_since(epoch, now), STALL_LIMIT).is_empty());
        let later = epoch + Duration::from_millis(1_100);
        stats[0].beat(epoch, later);
        assert_eq!(
            stalled(beats(), millis_since(epoch, later), STALL_LIMIT),
            vec![1]
        );
    }

    #[test]
    fn each_workers_heartbeat_has_a_cache_line_of_its_own() {
        assert_eq!(std::mem::align_of::<WorkerStats>(), 64);
    }

    #[test]
    fn a_message_wakes_the_reading_loop() {
        let mut poll = mio::Poll::new().unwrap();
        let (outbox, inbox) = mailbox::<u32>(poll.registry()).unwrap();
        assert!(outbox.send(7));
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == WAKER));
        assert_eq!(inbox.next(), Some(7));
        assert_eq!(inbox.next(), None);
    }

    #[test]
    fn a_last_message_from_a_sender_that_is_gone_still_wakes_the_reader() {
        // A worker's last report is sent as its thread ends, dropping its outbox: the wake-up
        // must survive that (it did not while the senders alone owned the waker).
        for _ in 0..200 {
            let mut poll = mio::Poll::new().unwrap();
            let (outbox, inbox) = mailbox::<u32>(poll.registry()).unwrap();
            std::thread::spawn(move || {
                outbox.send(1);
            })
            .join()
            .unwrap();
            let mut events = mio::Events::with_capacity(4);
            poll.poll(&mut events, Some(Duration::from_secs(5)))
                .unwrap();
            assert!(events.iter().any(|e| e.token() == WAKER), "wake-up lost");
            assert_eq!(inbox.next(), Some(1));
        }
    }
}
