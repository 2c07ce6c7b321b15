//! The admin listener (`/readyz`, `/livez`, `/metrics`, `/debug/vars`): served by the supervisor's loop with the API's HTTP
//! parser, limits and timeouts, open through the lame duck and the drain until the process
//! exits. Its connections never hold up the exit.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Interest, Registry, Token};
use slog::{Logger, warn};

use crate::app::{App, Probes};
use crate::config::Config;
use crate::conn::{Shared, Table};
use crate::exposition::{Exposition, ProcessView};
use crate::listener::{Acceptor, Listener};
use crate::metrics::LoopMetrics;

/// The admin listener's token in the supervisor's poll.
pub const ADMIN_LISTENER: Token = Token(2);

/// Admin connections use tokens from here on (below are the supervisor's own).
const FIRST_CONN_TOKEN: usize = 16;

/// Admin connections held at once: probes and scrapers come a few at a time; more is a client
/// misbehaving, and they come out of the descriptor reserve (`capacity::FD_RESERVE_BASE`).
pub const MAX_ADMIN_CONNECTIONS: usize = 16;

/// The admin listener and its connections.
pub struct Admin {
    acceptor: Acceptor,
    table: Table,
    shared: Shared,
    /// A connection over [`MAX_ADMIN_CONNECTIONS`] was refused and not yet logged as recovered.
    over_limit: bool,
    /// Still accepting (false once handed over to an upgrade's new process).
    accepting: bool,
    log: Logger,
}

impl Admin {
    /// Serves `listener` from the loop owning `registry`; its scrapes read `workers`.
    pub fn open(
        mut listener: Listener,
        registry: &Registry,
        config: &Config,
        workers: Vec<Arc<LoopMetrics>>,
        log: &Logger,
    ) -> io::Result<Admin> {
        registry.register(listener.socket_mut(), ADMIN_LISTENER, Interest::READABLE)?;
        let metrics = Arc::new(LoopMetrics::default());
        let exposition = Exposition::new(workers, metrics.clone());
        Ok(Admin {
            acceptor: Acceptor::new(listener),
            table: Table::new(FIRST_CONN_TOKEN, metrics.clone()),
            shared: Shared::new(App::admin(exposition), config, metrics),
            over_limit: false,
            accepting: true,
            log: log.new(slog::o!("listener" => "admin")),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.listener().addr()
    }

    /// The listening socket's descriptor (to hand over in an upgrade).
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.acceptor.listener().socket().as_raw_fd()
    }

    /// Stops accepting: the socket now belongs to an upgrade's new process (it stays open
    /// here, never shut down); connections already accepted are still served.
    pub fn stop_accepting(&mut self, registry: &Registry) {
        let _ = registry.deregister(self.acceptor.listener_mut().socket_mut());
        self.accepting = false;
    }

    /// The time of this wake-up, and what the probes and scrapes answer now.
    pub fn update(&mut self, probes: Probes, view: ProcessView) {
        self.shared.tick();
        self.shared.app.set_state(probes, view);
    }

    /// Accepts until the queue is empty (as the API's listener does, pausing by deadline when
    /// descriptors run out: returns when to resume); one over [`MAX_ADMIN_CONNECTIONS`] is
    /// closed at once.
    pub fn accept_ready(&mut self, registry: &Registry, now: Instant) -> Option<Instant> {
        if !self.accepting {
            return None;
        }
        let (table, shared, over_limit, log) = (
            &mut self.table,
            &self.shared,
            &mut self.over_limit,
            &self.log,
        );
        let open = table.open();
        self.acceptor.accept_all(
            now,
            log,
            || open,
            |stream, peer| {
                if table.open() >= MAX_ADMIN_CONNECTIONS {
                    if !*over_limit {
                        warn!(log, "too many admin connections, closing new ones";
                          "max" => MAX_ADMIN_CONNECTIONS);
                        *over_limit = true;
                    }
                    return;
                }
                *over_limit = false;
                table.adopt(registry, stream, peer, &shared.context(), log);
            },
        )
    }

    /// An accept pause is over: accept what waited meanwhile.
    pub fn resume_accepting(&mut self, registry: &Registry, now: Instant) -> Option<Instant> {
        self.acceptor.resume();
        self.accept_ready(registry, now)
    }

    /// Readiness of one of the admin connections.
    pub fn on_event(&mut self, registry: &Registry, event: &Event) {
        let cx = self.shared.context();
        self.table.on_event(registry, event, &cx, false, &self.log);
    }

    /// The poll timeout the admin connections ask for.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.table.timeout(now)
    }

    /// Drives the admin connections whose deadline is due, then frees the closed ones.
    pub fn expire(&mut self, registry: &Registry) {
        let cx = self.shared.context();
        self.table.expire(registry, &cx, false, &self.log);
        self.table.free_closed();
    }
}
