//! Counters and gauges of one loop, written by that loop alone (a plain load and store on
//! atomics of its own cache lines: no lock, no contended read-modify-write on the request
//! path), and read by the supervisor when `/metrics` or `/debug/vars` is scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The statuses greenlight sends, in the order their counters are kept.
pub const STATUSES: [u16; 12] = [200, 400, 404, 405, 408, 413, 414, 417, 431, 501, 503, 505];

/// Upper bounds of the request duration histogram's buckets, in microseconds: 50 µs to 10 s,
/// about three per decade (Prometheus' default buckets start at 5 ms, far above a request
/// answered from the loop in a few microseconds).
pub const DURATION_BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Where an open connection is, for the open-connections gauges (nginx's stub_status triple,
/// with its "writing" split in two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// No byte of a request held, nothing to write: nginx's "waiting".
    Idle,
    /// Part of a request head or body has arrived.
    Reading,
    /// A complete request waits for its handler.
    Handling,
    /// A response is being written (or the connection lingers before closing).
    Writing,
}

impl ConnState {
    /// Every state, in counter order.
    pub const ALL: [ConnState; 4] = [
        ConnState::Idle,
        ConnState::Reading,
        ConnState::Handling,
        ConnState::Writing,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Idle => "idle",
            ConnState::Reading => "reading",
            ConnState::Handling => "handling",
            ConnState::Writing => "writing",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a connection was closed, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closed it after its last response (`Connection: close`, an error).
    Finished,
    /// The peer closed it.
    PeerClosed,
    /// Idle past the keep-alive idle timeout.
    IdleTimeout,
    /// A request did not arrive within the read timeout (408).
    ReadTimeout,
    /// A response was not written within the write timeout.
    WriteTimeout,
    /// Idle when the drain began.
    Drained,
    /// Force-closed at the shutdown deadline or on a second signal.
    Forced,
    /// Over `--max-connections`: closed at once, unread (counted by the supervisor).
    OverLimit,
    /// A socket error (reset by the peer, broken pipe).
    Error,
}

impl CloseReason {
    /// Every reason, in counter order.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Finished,
        CloseReason::PeerClosed,
        CloseReason::IdleTimeout,
        CloseReason::ReadTimeout,
        CloseReason::WriteTimeout,
        CloseReason::Drained,
        CloseReason::Forced,
        CloseReason::OverLimit,
        CloseReason::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Finished => "finished",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ReadTimeout => "read_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::Drained => "drained",
            CloseReason::Forced => "forced",
            CloseReason::OverLimit => "over_limit",
            CloseReason::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One loop's figures. Every field has one writer, the loop that owns this block; cache-line
/// aligned so that no two loops' blocks share a line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct LoopMetrics {
    requests_received: AtomicU64,
    responses: [AtomicU64; STATUSES.len()],
    /// A status not in [`STATUSES`] (none today; kept so no response goes uncounted).
    responses_other: AtomicU64,
    /// Per bucket of [`DURATION_BUCKETS_US`] plus one for +Inf; not cumulative.
    duration_buckets: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    duration_sum_us: AtomicU64,
    connections: [AtomicU64; ConnState::ALL.len()],
    closed: [AtomicU64; CloseReason::ALL.len()],
}

/// Adds `n` to a counter this thread alone writes: a load and a store, no locked instruction.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl LoopMetrics {
    /// The first byte of a request arrived.
    pub fn request_received(&self) {
        add(&self.requests_received, 1);
    }

    /// A response was queued, `elapsed` after its request's first byte.
    pub fn responded(&self, status: u16, elapsed: Duration) {
        match STATUSES.iter().position(|&s| s == status) {
            Some(index) => {
                if let Some(counter) = self.responses.get(index) {
                    add(counter, 1);
                }
            }
            None => add(&self.responses_other, 1),
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS_US.partition_point(|&bound| bound < micros);
        if let Some(counter) = self.duration_buckets.get(bucket) {
            add(counter, 1);
        }
        add(&self.duration_sum_us, micros);
    }

    /// A connection moved between states (`None`: it was just opened, or is closing).
    pub fn moved(&self, from: Option<ConnState>, to: Option<ConnState>) {
        if let Some(counter) = from.and_then(|s| self.connections.get(s.index())) {
            counter.store(read(counter).saturating_sub(1), Ordering::Relaxed);
        }
        if let Some(counter) = to.and_then(|s| self.connections.get(s.index())) {
            add(counter, 1);
        }
    }

    /// A connection was closed.
    pub fn closed(&self, reason: CloseReason) {
        if let Some(counter) = self.closed.get(reason.index()) {
            add(counter, 1);
        }
    }

    /// Connections closed so far, for every reason.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().map(read).sum()
    }

    /// A plain copy of the figures, for adding up.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests_received: read(&self.requests_received),
            responses: self.responses.each_ref().map(read),
            responses_other: read(&self.responses_other),
            duration_buckets: self.duration_buckets.each_ref().map(read),
            duration_sum_us: read(&self.duration_sum_us),
            connections: self.connections.each_ref().map(read),
            closed: self.closed.each_ref().map(read),
        }
    }
}

/// Figures read from one or more loops, added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests whose first byte arrived.
    pub requests_received: u64,
    /// Responses by [`STATUSES`] index.
    pub responses: [u64; STATUSES.len()],
    /// Responses with a status not in [`STATUSES`].
    pub responses_other: u64,
    /// Request durations by bucket (not cumulative; the last is +Inf).
    pub duration_buckets: [u64; DURATION_BUCKETS_US.len() + 1],
    /// Sum of request durations, microseconds.
    pub duration_sum_us: u64,
    /// Open connections by [`ConnState`].
    pub connections: [u64; ConnState::ALL.len()],
    /// Closed connections by [`CloseReason`].
    pub closed: [u64; CloseReason::ALL.len()],
}

impl Snapshot {
    /// Adds another loop's figures.
    pub fn add(&mut self, other: &Snapshot) {
        fn sum<const N: usize>(into: &mut [u64; N], from: &[u64; N]) {
            for (a, b) in into.iter_mut().zip(from) {
                *a = a.wrapping_add(*b);
            }
        }
        self.requests_received = self.requests_received.wrapping_add(other.requests_received);
        sum(&mut self.responses, &other.responses);
        self.responses_other = self.responses_other.wrapping_add(other.responses_other);
        sum(&mut self.duration_buckets, &other.duration_buckets);
        self.duration_sum_us = self.duration_sum_us.wrapping_add(other.duration_sum_us);
        sum(&mut self.connections, &other.connections);
        sum(&mut self.closed, &other.closed);
    }

    /// Responses sent, all statuses.
    pub fn responses_sent(&self) -> u64 {
        self.responses.iter().sum::<u64>() + self.responses_other
    }

    /// Open connections in `state`.
    pub fn open(&self, state: ConnState) -> u64 {
        self.connections.get(state.index()).copied().unwrap_or(0)
    }

    /// Open connections, all states.
    pub fn open_total(&self) -> u64 {
        self.connections.iter().sum()
    }

    /// Requests received and not yet answered: connections reading or handling one.
    pub fn in_flight(&self) -> u64 {
        self.open(ConnState::Reading) + self.open(ConnState::Handling)
    }

    /// Connections closed for `reason`.
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        self.closed.get(reason.index()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_counts_its_status_and_its_duration_bucket() {
        let metrics = LoopMetrics::default();
        metrics.request_received();
        metrics.responded(200, Duration::from_micros(30));
        metrics.responded(200, Duration::from_micros(50));
        metrics.responded(404, Duration::from_micros(51));
        metrics.responded(408, Duration::from_secs(60));
        let s = metrics.snapshot();
        assert_eq!(s.requests_received, 1);
        assert_eq!(s.responses[0], 2);
        assert_eq!(s.responses[2], 1, "404");
        assert_eq!(s.responses_sent(), 4);
        assert_eq!(s.duration_buckets[0], 2, "<= 50 µs, bounds inclusive");
        assert_eq!(s.duration_buckets[1], 1, "<= 100 µs");
        assert_eq!(s.duration_buckets[DURATION_BUCKETS_US.len()], 1, "+Inf");
        assert_eq!(s.duration_sum_us, 30 + 50 + 51 + 60_000_000);
    }

    #[test]
    fn gauges_follow_moves_and_snapshots_add_up() {
        let metrics = LoopMetrics::default();
        metrics.moved(None, Some(ConnState::Idle));
        metrics.moved(None, Some(ConnState::Idle));
        metrics.moved(Some(ConnState::Idle), Some(ConnState::Reading));
        metrics.moved(Some(ConnState::Idle), None);
        metrics.closed(CloseReason::PeerClosed);
        let s = metrics.snapshot();
        assert_eq!(s.open(ConnState::Idle), 0);
        assert_eq!(s.open(ConnState::Reading), 1);
        assert_eq!(s.in_flight(), 1);
        assert_eq!(s.closed_for(CloseReason::PeerClosed), 1);
        let mut total = Snapshot::default();
        total.add(&s);
        total.add(&s);
        assert_eq!(total.open_total(), 2);
        assert_eq!(std::mem::align_of::<LoopMetrics>(), 64);
    }
}
