//! A connection: the socket, the bytes carried between wake-ups, the HTTP state machine, and
//! the close path (plain close, or half-close and linger while unread input may still arrive).

mod buffer;
pub mod machine;
mod table;

use std::io::{self, Read, Write};
use std::mem;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;
use slog::{Logger, info};

pub use buffer::{InputBuf, READ_BUFFER_BYTES, Scratch};

use crate::metrics::{CloseReason, ConnState};
pub use machine::{Context, Expiry, Machine, Timeouts};
pub use table::{Shared, Table};

/// How long a connection that was answered while the peer may still be sending is kept
/// half-closed, reading and discarding, before it is closed. Closing with unread input makes
/// the kernel send RST, which can destroy the response before the client reads it; Go waits
/// 500 ms (`rstAvoidanceDelay`), nginx up to 30 s (`lingering_time`). 2 s covers a loaded
/// client without holding a drain open for long.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Most bytes discarded while lingering: a client still streaming a large body is cut off.
pub const LINGER_MAX_BYTES: usize = 1024 * 1024;

/// How long a drain keeps a connection that has not sent a byte yet, counted from its accept.
/// A client writes its request right after the handshake completes, so a connection accepted
/// a moment before the signal usually has its request in flight: closing it at once loses
/// that request (the restart test under socket activation saw this). Go waits 5 s for such
/// connections; 50 ms covers the gap without holding a drain open.
pub const FRESH_CONNECTION_GRACE: Duration = Duration::from_millis(50);

/// Why a connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The last response was written (or the peer left with nothing in flight).
    Finished,
    /// A keep-alive connection was idle longer than the idle timeout.
    IdleTimeout,
    /// A response was not written within the write timeout.
    WriteTimeout,
    /// The lingering close ended: the peer closed, the linger time ran out, or it sent too much.
    Lingered,
    /// The socket failed (reset by the peer, broken pipe).
    Failed(io::ErrorKind),
    /// Idle when the drain began.
    Draining,
    /// Force-closed: the shutdown deadline passed or a second signal arrived.
    Forced,
}

impl Close {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Close::Finished => "finished",
            Close::IdleTimeout => "idle timeout",
            Close::WriteTimeout => "write timeout",
            Close::Lingered => "lingered",
            Close::Failed(_) => "socket error",
            Close::Draining => "idle at shutdown",
            Close::Forced => "forced",
        }
    }
}

/// Why this wake-up happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The socket is readable or writable (a hint: we read and write until WouldBlock).
    Io,
    /// The connection's deadline passed.
    Timer,
    /// The drain began: read what the peer has already sent and mark where the input stood
    /// before answering anything, so exactly the requests sent before the signal are answered.
    Drain,
}

/// What the write side is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// Responses are written as they are queued. Leaves to `Lingering` once the last response
    /// is written while the peer may still be sending; otherwise the connection just closes.
    Open,
    /// Our side is shut down (FIN sent after the last response); input is read and discarded
    /// until the peer closes or `until`. Terminal.
    Lingering { until: Instant, discarded: usize },
}

/// What one read brought.
enum ReadOutcome {
    /// `n` bytes; `short` when fewer than asked for, so the socket is drained for now.
    Data { n: usize, short: bool },
    /// The peer half-closed.
    Eof,
    /// Nothing more for now.
    WouldBlock,
}

/// One accepted connection.
pub struct Connection {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    accepted_at: Instant,
    machine: Machine,
    /// Input carried between wake-ups: a split request, or requests queued behind a handler.
    input: Vec<u8>,
    /// Output carried between wake-ups: the peer reads slower than we answer.
    output: Vec<u8>,
    writing: Writing,
    write_deadline: Option<Instant>,
    write_timeout: Option<Duration>,
    /// The event loop saw the peer's side close: read to EOF, a short read proves nothing.
    read_closed_hint: bool,
    /// We read EOF.
    read_eof: bool,
    bytes_in: u64,
    bytes_out: u64,
    interest: Interest,
    /// The deadline this connection is filed under in the loop's timers.
    pub filed_deadline: Option<Instant>,
    /// Closed during this batch of events; the slot is freed after it.
    closed: bool,
    /// Draining, and not a byte sent yet: kept until then in case its request is in flight.
    fresh_until: Option<Instant>,
    /// The state the loop's open-connections gauges count this connection in.
    pub counted_as: Option<ConnState>,
    /// A request timed out (408): its close counts as a read timeout.
    timed_out: bool,
}

/// One row of the SIGQUIT connection table.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Connection id (accept order).
    pub id: u64,
    /// Peer address.
    pub peer: SocketAddr,
    /// State name.
    pub state: &'static str,
    /// Time since accept.
    pub age: Duration,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

impl Connection {
    /// Wraps a freshly accepted stream (registered by the caller with [`Connection::interest`]).
    pub fn new(id: u64, stream: TcpStream, peer: SocketAddr, cx: &Context<'_>) -> Connection {
        Connection {
            id,
            stream,
            peer,
            accepted_at: cx.now,
            machine: Machine::new(cx),
            input: Vec::new(),
            output: Vec::new(),
            writing: Writing::Open,
            write_deadline: None,
            write_timeout: cx.timeouts.write,
            read_closed_hint: false,
            read_eof: false,
            bytes_in: 0,
            bytes_out: 0,
            interest: Interest::READABLE,
            filed_deadline: None,
            closed: false,
            fresh_until: None,
            counted_as: None,
            timed_out: false,
        }
    }

    /// While draining: is this idle connection too fresh to close? True for one that has not
    /// sent a byte and was accepted less than [`FRESH_CONNECTION_GRACE`] ago; it is then held
    /// (with a deadline) until that grace ends.
    pub fn held_as_fresh(&mut self, now: Instant) -> bool {
        let until = self.accepted_at + FRESH_CONNECTION_GRACE;
        let fresh = self.bytes_in == 0 && now < until;
        self.fresh_until = fresh.then_some(until);
        fresh
    }

    /// Closed, waiting for its slot to be freed: events for it are ignored.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Marks the connection closed (the socket is dropped with the slot).
    pub fn mark_closed(&mut self) {
        self.closed = true;
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The interest currently registered.
    pub fn interest(&self) -> Interest {
        self.interest
    }

    /// The interest the connection needs now: writable only while output is pending.
    pub fn wanted_interest(&self) -> Interest {
        if self.output.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        }
    }

    /// Records that `interest` is now registered.
    pub fn set_interest(&mut self, interest: Interest) {
        self.interest = interest;
    }

    /// The event loop reported the peer's side closed.
    pub fn note_read_closed(&mut self) {
        self.read_closed_hint = true;
    }

    /// Holds no byte of a request, runs no handler, has nothing to write: safe to close now.
    pub fn is_idle(&self) -> bool {
        self.writing == Writing::Open
            && self.machine.is_idle()
            && self.input.is_empty()
            && self.output.is_empty()
    }

    /// The nearest of the connection's deadlines.
    pub fn deadline(&self) -> Option<Instant> {
        match self.writing {
            Writing::Lingering { until, .. } => Some(until),
            Writing::Open => [
                self.machine.deadline(),
                self.write_deadline,
                self.fresh_until,
            ]
            .into_iter()
            .flatten()
            .min(),
        }
    }

    /// Reads, answers and writes as far as the socket allows. `Err` means close it now.
    pub fn drive(
        &mut self,
        wake: Wake,
        scratch: &mut Scratch,
        cx: &Context<'_>,
        log: &Logger,
    ) -> Result<(), Close> {
        if let Writing::Lingering { until, .. } = self.writing {
            if wake == Wake::Timer && until <= cx.now {
                return Err(Close::Lingered);
            }
            return self.linger(&mut scratch.input);
        }
        if wake == Wake::Timer && self.write_deadline.is_some_and(|d| d <= cx.now) {
            return Err(Close::WriteTimeout);
        }
        if wake == Wake::Drain {
            if !self.machine.is_done() {
                self.read_pending(&mut scratch.input)?;
            }
            self.machine.begin_drain(self.bytes_in);
        }

        // Borrow the scratch buffers; a connection keeps bytes only while something is split.
        scratch.input.load(&self.input);
        self.input = Vec::new();
        let carried = !self.output.is_empty();
        let mut out = if carried {
            mem::take(&mut self.output)
        } else {
            let mut out = mem::take(&mut scratch.output);
            out.clear();
            out
        };
        let mut sent = 0;

        let result = self.pump(wake, &mut scratch.input, &mut out, &mut sent, cx, log);

        if !scratch.input.is_empty() {
            self.input = scratch.input.filled().to_vec();
        }
        let unsent = out.get(sent..).unwrap_or_default();
        if carried {
            out.drain(..sent.min(out.len()));
            self.output = if out.is_empty() { Vec::new() } else { out };
        } else {
            if !unsent.is_empty() {
                self.output = unsent.to_vec();
            }
            scratch.output = out;
        }
        self.write_deadline = match (self.output.is_empty(), self.write_deadline) {
            (true, _) => None,
            (false, Some(deadline)) => Some(deadline),
            (false, None) => self.write_timeout.map(|t| cx.now + t),
        };
        result?;

        if self.machine.is_done() && self.output.is_empty() {
            if !self.machine.has_unread_input() || self.read_eof {
                return Err(Close::Finished);
            }
            // Half-close so the client sees the end of the response, then discard what it
            // still sends (RFC 9112 §9.6: close in stages).
            let _ = self.stream.shutdown(Shutdown::Write);
            self.input = Vec::new();
            self.writing = Writing::Lingering {
                until: cx.now + LINGER_TIMEOUT,
                discarded: 0,
            };
            return self.linger(&mut scratch.input);
        }
        Ok(())
    }

    /// Reads what the peer has already sent into the carried input, without answering it.
    fn read_pending(&mut self, scratch: &mut InputBuf) -> Result<(), Close> {
        scratch.load(&self.input);
        while !scratch.is_full() {
            match self.read_some(scratch) {
                Ok(ReadOutcome::Data { .. }) => {}
                Ok(ReadOutcome::Eof) => {
                    self.read_eof = true;
                    break;
                }
                Ok(ReadOutcome::WouldBlock) => break,
                Err(e) => return Err(Close::Failed(e.kind())),
            }
        }
        self.input = scratch.filled().to_vec();
        scratch.load(&[]);
        Ok(())
    }

    /// The loop of one wake-up: answer what is buffered, write, read more, until WouldBlock.
    fn pump(
        &mut self,
        wake: Wake,
        input: &mut InputBuf,
        out: &mut Vec<u8>,
        sent: &mut usize,
        cx: &Context<'_>,
        log: &Logger,
    ) -> Result<(), Close> {
        if wake == Wake::Timer {
            match self.machine.expire(out, cx) {
                Expiry::Nothing => {}
                Expiry::Idle => return Err(Close::IdleTimeout),
                Expiry::RequestTimeout => {
                    self.timed_out = true;
                    self.log_request_error(log, 408, "request timeout");
                }
            }
        }
        let mut drained = false;
        loop {
            // Answer what is buffered; once a backlog is written out, answer more before reading.
            let backlogged = loop {
                let step = self.machine.advance(input.filled(), out, cx);
                input.consume(step.consumed);
                if let Some(error) = step.error {
                    let (status, message) = error.response();
                    self.log_request_error(log, status.code(), message);
                }
                if self.read_eof {
                    self.machine.on_peer_eof();
                }
                let was_full = out.len() - *sent >= machine::MAX_PENDING_OUTPUT_BYTES;
                self.flush(out, sent)?;
                let backlogged = out.len() - *sent >= machine::MAX_PENDING_OUTPUT_BYTES;
                if !was_full || backlogged || step.consumed == 0 || input.is_empty() {
                    break backlogged;
                }
            };
            if drained || self.read_eof || self.machine.is_done() || input.is_full() || backlogged {
                return Ok(());
            }
            match self.read_some(input) {
                Ok(ReadOutcome::Data { short, .. }) => drained = short && !self.read_closed_hint,
                Ok(ReadOutcome::Eof) => self.read_eof = true,
                Ok(ReadOutcome::WouldBlock) => return Ok(()),
                Err(e) => return Err(Close::Failed(e.kind())),
            }
        }
    }

    /// Reads once into the spare space of `input`, retrying on EINTR.
    fn read_some(&mut self, input: &mut InputBuf) -> io::Result<ReadOutcome> {
        let spare = input.spare();
        let want = spare.len();
        loop {
            match self.stream.read(spare) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => {
                    input.commit(n);
                    self.bytes_in += n as u64;
                    return Ok(ReadOutcome::Data { n, short: n < want });
                }
                Err(e) if would_block(&e) => return Ok(ReadOutcome::WouldBlock),
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `out[sent..]` until done or WouldBlock; a short write is not an error.
    fn flush(&mut self, out: &mut Vec<u8>, sent: &mut usize) -> Result<(), Close> {
        while let Some(unsent) = out.get(*sent..).filter(|rest| !rest.is_empty()) {
            match self.stream.write(unsent) {
                Ok(0) => return Err(Close::Failed(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    *sent += n;
                    self.bytes_out += n as u64;
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(Close::Failed(e.kind())),
            }
        }
        out.clear();
        *sent = 0;
        Ok(())
    }

    /// Discards input until EOF (close), WouldBlock (wait) or too much.
    fn linger(&mut self, scratch: &mut InputBuf) -> Result<(), Close> {
        loop {
            scratch.load(&[]);
            match self.read_some(scratch) {
                Ok(ReadOutcome::Data { n, .. }) => {
                    if let Writing::Lingering { discarded, .. } = &mut self.writing {
                        *discarded += n;
                        if *discarded > LINGER_MAX_BYTES {
                            return Err(Close::Lingered);
                        }
                    }
                }
                Ok(ReadOutcome::Eof) => return Err(Close::Lingered),
                Ok(ReadOutcome::WouldBlock) => return Ok(()),
                Err(e) => return Err(Close::Failed(e.kind())),
            }
        }
    }

    /// The connection's id and peer, as key-value pairs for a log line. Values are formatted
    /// only if the line passes the level filter, so a filtered debug line costs nothing.
    pub fn log_fields(&self) -> ConnFields {
        ConnFields {
            id: self.id,
            peer: self.peer,
        }
    }

    fn log_request_error(&self, root: &Logger, status: u16, message: &str) {
        info!(root, "request error"; self.log_fields(), "status" => status, "error" => message);
    }

    /// The connection's row in the SIGQUIT dump.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let state = match self.writing {
            Writing::Lingering { .. } => "lingering",
            Writing::Open if !self.output.is_empty() => "writing",
            Writing::Open if self.machine.is_idle() && !self.input.is_empty() => "reading-head",
            Writing::Open => self.machine.state_name(),
        };
        Snapshot {
            id: self.id,
            peer: self.peer,
            state,
            age: now.saturating_duration_since(self.accepted_at),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }

    /// Responses queued so far.
    pub fn served(&self) -> u64 {
        self.machine.served()
    }

    /// Where the connection is, for the open-connections gauges.
    pub fn state(&self) -> ConnState {
        match self.writing {
            Writing::Lingering { .. } => ConnState::Writing,
            Writing::Open if !self.output.is_empty() => ConnState::Writing,
            Writing::Open if self.machine.is_idle() && !self.input.is_empty() => ConnState::Reading,
            Writing::Open => self.machine.conn_state(),
        }
    }

    /// Why it was closed, as the closed-connections counter labels it.
    pub fn close_reason(&self, close: Close) -> CloseReason {
        match close {
            Close::Finished | Close::Lingered if self.timed_out => CloseReason::ReadTimeout,
            Close::Finished | Close::Lingered if self.read_eof => CloseReason::PeerClosed,
            Close::Finished | Close::Lingered => CloseReason::Finished,
            Close::IdleTimeout => CloseReason::IdleTimeout,
            Close::WriteTimeout => CloseReason::WriteTimeout,
            Close::Failed(_) => CloseReason::Error,
            Close::Draining => CloseReason::Drained,
            Close::Forced => CloseReason::Forced,
        }
    }
}

/// Only what matters when reading a dump: who, in what state, how long, how much.
impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("state", &self.snapshot(Instant::now()).state)
            .field("bytes_in", &self.bytes_in)
            .field("bytes_out", &self.bytes_out)
            .field("carried_in", &self.input.len())
            .field("carried_out", &self.output.len())
            .finish()
    }
}

/// `conn` and `peer` fields of a connection's log lines.
pub struct ConnFields {
    id: u64,
    peer: SocketAddr,
}

impl slog::KV for ConnFields {
    fn serialize(
        &self,
        _record: &slog::Record<'_>,
        serializer: &mut dyn slog::Serializer,
    ) -> slog::Result {
        serializer.emit_u64(slog::Key::from("conn"), self.id)?;
        serializer.emit_arguments(slog::Key::from("peer"), &format_args!("{}", self.peer))
    }
}

/// Not a failure: the socket has nothing more for now (habit 7).
pub fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

/// Not a failure: a signal interrupted the call; retry it (habit 7).
pub fn interrupted(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::App;
    use crate::config::Environment;
    use crate::http::Limits;

    #[test]
    fn a_connection_that_never_spoke_is_held_only_for_the_fresh_grace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let app = App::api(Environment::Development, Duration::ZERO);
        let limits = Limits::default();
        let timeouts = Timeouts {
            read: Some(Duration::from_secs(5)),
            idle: Some(Duration::from_secs(60)),
            write: Some(Duration::from_secs(10)),
        };
        let accepted_at = Instant::now();
        let metrics = crate::metrics::LoopMetrics::default();
        let cx = Context {
            now: accepted_at,
            date: b"Sun, 06 Nov 1994 08:49:37 GMT",
            app: &app,
            limits: &limits,
            timeouts: &timeouts,
            metrics: &metrics,
            closing: false,
        };
        let mut conn = Connection::new(1, TcpStream::from_std(accepted), peer, &cx);
        assert!(conn.is_idle());

        assert!(conn.held_as_fresh(accepted_at + Duration::from_millis(10)));
        assert_eq!(conn.deadline(), Some(accepted_at + FRESH_CONNECTION_GRACE));
        assert!(!conn.held_as_fresh(accepted_at + FRESH_CONNECTION_GRACE));
        assert_eq!(conn.deadline(), Some(accepted_at + Duration::from_secs(5)));

        conn.bytes_in = 1;
        assert!(
            !conn.held_as_fresh(accepted_at),
            "a connection that spoke is not fresh"
        );
    }
}
