//! Deadlines: an ordered set of (deadline, what expires). The nearest deadline is the poll
//! timeout; after every wake-up everything due is expired (async-io's reactor, nginx's timers).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The deadlines of one loop, ordered by time (ties broken by key). `K` names what a deadline
/// belongs to: each loop (the supervisor's, a worker's) has its own key type.
#[derive(Debug)]
pub struct Timers<K> {
    entries: BTreeSet<(Instant, K)>,
}

impl<K: Ord + Copy> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            entries: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Copy> Timers<K> {
    /// An empty set.
    pub fn new() -> Timers<K> {
        Timers::default()
    }

    /// Moves `key` from deadline `old` to `new`; either may be `None`.
    pub fn reschedule(&mut self, key: K, old: Option<Instant>, new: Option<Instant>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.entries.remove(&(old, key));
        }
        if let Some(new) = new {
            self.entries.insert((new, key));
        }
    }

    /// The poll timeout: time until the nearest deadline, zero if one is due, `None` if there
    /// is none (poll blocks until an event).
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.entries
            .first()
            .map(|(deadline, _)| deadline.saturating_duration_since(now))
    }

    /// Removes and returns one entry due at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<K> {
        match self.entries.first() {
            Some(&(deadline, _)) if deadline <= now => self.entries.pop_first().map(|(_, key)| key),
            _ => None,
        }
    }

    /// Number of deadlines held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No deadline is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum TimerKey {
        ShutdownDeadline,
        Conn(usize),
    }

    #[test]
    fn nearest_deadline_is_the_timeout_and_expires_first() {
        let now = Instant::now();
        let mut timers = Timers::<TimerKey>::new();
        timers.reschedule(TimerKey::Conn(1), None, Some(now + Duration::from_secs(5)));
        timers.reschedule(TimerKey::Conn(2), None, Some(now + Duration::from_secs(1)));
        timers.reschedule(
            TimerKey::ShutdownDeadline,
            None,
            Some(now + Duration::from_secs(3)),
        );
        assert_eq!(timers.timeout(now), Some(Duration::from_secs(1)));

        let later = now + Duration::from_secs(3);
        assert_eq!(timers.pop_expired(later), Some(TimerKey::Conn(2)));
        assert_eq!(timers.pop_expired(later), Some(TimerKey::ShutdownDeadline));
        assert_eq!(timers.pop_expired(later), None);
        assert_eq!(timers.timeout(later), Some(Duration::from_secs(2)));
    }

    #[test]
    fn rescheduling_moves_and_removes_entries() {
        let now = Instant::now();
        let mut timers = Timers::<TimerKey>::new();
        let first = Some(now + Duration::from_secs(1));
        let second = Some(now + Duration::from_secs(2));
        timers.reschedule(TimerKey::Conn(7), None, first);
        timers.reschedule(TimerKey::Conn(7), first, second);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.timeout(now), Some(Duration::from_secs(2)));
        timers.reschedule(TimerKey::Conn(7), second, None);
        assert!(timers.is_empty());
        assert_eq!(timers.timeout(now), None);
    }
}
