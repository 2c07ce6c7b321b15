//! How many connections the process can hold: its descriptor limit, raised at start-up from
//! the soft to the hard `RLIMIT_NOFILE`, and the connection cap that limit allows.

use std::io;

/// Descriptors greenlight keeps for itself whatever the worker count: stdin/stdout/stderr (3),
/// the supervisor's epoll, its waker and the signal pipe (4), the API and admin listeners (2),
/// the socket sd-notify opens per notification (1), an upgrade's inherited sockets and
/// readiness pipe (4), and admin connections and slack for whatever a library opens (18).
pub const FD_RESERVE_BASE: u64 = 32;

/// Descriptors each worker keeps for itself: its epoll and its waker's eventfd.
pub const FD_RESERVE_PER_WORKER: u64 = 2;

/// The descriptor limit assumed if it cannot be read: the usual soft default of a shell.
pub const ASSUMED_FD_LIMIT: u64 = 1024;

/// The largest cap `auto` gives, as for an explicit `--max-connections`.
pub const MAX_CONNECTIONS_CEILING: usize = 1_000_000;

/// The descriptor limits, as found and as left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The soft limit the process was started with (handed on to an upgraded process, so it
    /// makes the same decision as this one did).
    pub original_soft: u64,
    /// The soft limit now in force: the most descriptors the process can hold.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, never above it and never lower than it
/// was (Go does this at start-up since 1.19; nginx has `worker_rlimit_nofile`). Call it before
/// opening any socket. If the raise is refused the limits stay as they were.
pub fn raise_fd_limit() -> io::Result<FdLimits> {
    let found = get_nofile()?;
    let original_soft = found.rlim_cur;
    if found.rlim_cur < found.rlim_max {
        // An unlimited hard limit still cannot pass the kernel's `fs.nr_open`.
        let target = if found.rlim_max == libc::RLIM_INFINITY {
            nr_open().unwrap_or(found.rlim_cur).max(found.rlim_cur)
        } else {
            found.rlim_max
        };
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: found.rlim_max,
        };
        // SAFETY: setrlimit reads a valid rlimit value.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    }
    let now = get_nofile()?;
    Ok(FdLimits {
        original_soft,
        soft: now.rlim_cur,
        hard: now.rlim_max,
    })
}

/// The kernel's ceiling on any process's descriptor limit.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit value it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Descriptors greenlight keeps for itself with `workers` workers.
pub fn reserve(workers: usize) -> u64 {
    FD_RESERVE_BASE + FD_RESERVE_PER_WORKER * workers as u64
}

/// `--max-connections`: a number, or `auto` (as many as the descriptor limit allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxConnections {
    /// The descriptor limit minus [`reserve`].
    Auto,
    /// At most this many (lowered to what the limit allows).
    Count(usize),
}

/// The connection cap in force, and what was asked for if the limit forced it lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Connections held at once by the whole process.
    pub max_connections: usize,
    /// An explicit `--max-connections` above what the descriptor limit allows.
    pub lowered_from: Option<usize>,
}

/// The cap for `asked` under a limit of `max_fds` descriptors with `workers` workers: never
/// more connections than descriptors left after greenlight's own (at least one).
pub fn connection_cap(asked: MaxConnections, max_fds: u64, workers: usize) -> Cap {
    let allowed = max_fds
        .saturating_sub(reserve(workers))
        .clamp(1, MAX_CONNECTIONS_CEILING as u64) as usize;
    match asked {
        MaxConnections::Auto => Cap {
            max_connections: allowed,
            lowered_from: None,
        },
        MaxConnections::Count(n) if n > allowed => Cap {
            max_connections: allowed,
            lowered_from: Some(n),
        },
        MaxConnections::Count(n) => Cap {
            max_connections: n,
            lowered_from: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_limit_less_the_reserve() {
        let cap = connection_cap(MaxConnections::Auto, 20_000, 2);
        assert_eq!(cap.max_connections, 20_000 - 32 - 4);
        assert_eq!(cap.lowered_from, None);
        assert_eq!(
            connection_cap(MaxConnections::Auto, 10, 4).max_connections,
            1,
            "never below one"
        );
        assert_eq!(
            connection_cap(MaxConnections::Auto, u64::MAX, 1).max_connections,
            MAX_CONNECTIONS_CEILING
        );
    }

    #[test]
    fn an_explicit_cap_above_the_limit_is_lowered_and_says_so() {
        let cap = connection_cap(MaxConnections::Count(1000), 64, 2);
        assert_eq!(cap.max_connections, 64 - 36);
        assert_eq!(cap.lowered_from, Some(1000));
        let fits = connection_cap(MaxConnections::Count(100), 4096, 2);
        assert_eq!(fits.max_connections, 100);
        assert_eq!(fits.lowered_from, None);
    }

    #[test]
    fn raising_never_lowers_and_never_passes_the_hard_limit() {
        let limits = raise_fd_limit().unwrap();
        assert!(limits.soft >= limits.original_soft);
        assert!(limits.soft <= limits.hard);
        if limits.hard != libc::RLIM_INFINITY {
            assert_eq!(limits.soft, limits.hard, "raised all the way");
        }
    }
}
