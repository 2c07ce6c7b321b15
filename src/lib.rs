//! greenlight: the Greenlight healthcheck API on one `mio` event loop, with a graceful shutdown
//! that loses nothing.
//!
//! # Anatomy
//!
//! A [`supervisor`] thread and N [`worker`] threads each run one `mio` loop; they talk only
//! through [`mailbox`]es (a channel plus a waker). Three things travel through them:
//!
//! **A request** goes one way:
//! [`listener`] (the supervisor accepts until WouldBlock) -> [`crew`] (dealt round-robin to a
//! worker) -> [`conn`] (the worker reads into its loop's scratch buffer)
//! -> [`http`] (parse the head, frame and discard the body) -> [`app`] (route, handle)
//! -> [`http::response`] (encode head and JSON body into the write buffer) -> [`conn`]
//! (one write for a whole batch of pipelined responses) -> keep-alive, or close (lingering
//! while the client may still be sending).
//!
//! **A signal** goes: signal-hook's pipe (an event source of the supervisor's loop) ->
//! [`shutdown`] (`Serving` -> `Draining`) -> the listener is drained of queued connections and
//! closed -> `Drain` to every worker, behind the connections dealt to it -> every connection
//! reads what it has pending, idle ones close at once, active ones finish their response with
//! `Connection: close` -> each worker's last close ends its loop -> when all have, the
//! supervisor logs `stopped server` -> exit status.
//!
//! **Time** goes: every deadline lives in its loop's [`timers`] (a worker's: read, idle, write,
//! linger, a slow handler, its heartbeat; the supervisor's: the shutdown grace period, resuming
//! accept, the watchdog); the nearest one is the poll timeout; after every wake-up whatever is
//! due expires. Nothing in a loop blocks or sleeps.
#![deny(missing_docs)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod admin;
pub mod app;
pub mod capacity;
pub mod config;
pub mod conn;
pub mod crew;
pub mod exposition;
pub mod http;
pub mod listener;
pub mod log;
pub mod mailbox;
pub mod metrics;
pub mod shutdown;
pub mod supervisor;
pub mod systemd;
pub mod timers;
pub mod upgrade;
pub mod worker;

pub use config::Config;
pub use shutdown::Exit;
pub use supervisor::Supervisor;
