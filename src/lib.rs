//! greenlight: the Greenlight healthcheck API on one `mio` event loop, with a graceful shutdown
//! that loses nothing.
//!
//! # Anatomy
//!
//! One thread runs one loop ([`server`]). Three things travel through it:
//!
//! **A request** goes one way:
//! [`listener`] (accept until WouldBlock) -> [`conn`] (read into the loop's scratch buffer)
//! -> [`http`] (parse the head, frame and discard the body) -> [`app`] (route, handle)
//! -> [`http::response`] (encode head and JSON body into the write buffer) -> [`conn`]
//! (one write for a whole batch of pipelined responses) -> keep-alive, or close (lingering
//! while the client may still be sending).
//!
//! **A signal** goes: signal-hook's pipe (an event source like any socket) -> [`shutdown`]
//! (`Serving` -> `Draining`) -> the listener is drained of queued connections and closed,
//! every connection reads what it has pending, idle ones close at once, active ones finish
//! their response with `Connection: close` -> the last close ends the loop -> exit status.
//!
//! **Time** goes: every deadline (read, idle, write, linger, a slow handler, the shutdown grace
//! period, resuming accept) lives in [`timers`]; the nearest one is the poll timeout; after
//! every wake-up whatever is due expires. Nothing in the loop blocks or sleeps.
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

pub mod app;
pub mod config;
pub mod conn;
pub mod crew;
pub mod http;
pub mod listener;
pub mod log;
pub mod mailbox;
pub mod shutdown;
pub mod supervisor;
pub mod systemd;
pub mod timers;
pub mod worker;

pub use config::Config;
pub use shutdown::Exit;
pub use supervisor::Supervisor;
