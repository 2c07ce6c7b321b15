//! The per-connection HTTP/1.1 state machine, free of I/O: bytes in, responses out, deadlines.
//! `Connection` feeds it what the socket delivered; unit tests feed it scripted bytes split at
//! every boundary.

use std::mem;
use std::time::{Duration, Instant};

use crate::app::{App, ErrorBody, Routed};
use crate::http::{
    BodyDecoder, CONTINUE, HttpError, Limits, Persistence, ResponseHead, Status, encode, parse_head,
};
use crate::metrics::{ConnState, LoopMetrics};

/// Response bytes a connection may have queued before it stops taking further requests off its
/// input: a client that pipelines requests but never reads the answers costs at most this much.
pub const MAX_PENDING_OUTPUT_BYTES: usize = 64 * 1024;

/// The timeouts a connection obeys; `None` disables one.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A request (head and body) must arrive within this, from its first byte (from the accept
    /// for a connection's first request).
    pub read: Option<Duration>,
    /// A keep-alive connection may wait this long for its next request.
    pub idle: Option<Duration>,
    /// A response must be written within this.
    pub write: Option<Duration>,
}

/// What the machine reads from the rest of the server.
pub struct Context<'a> {
    /// The time of the current wake-up.
    pub now: Instant,
    /// The `Date` header value for this second.
    pub date: &'a [u8],
    /// The router and handlers.
    pub app: &'a App,
    /// The request limits.
    pub limits: &'a Limits,
    /// The timeouts.
    pub timeouts: &'a Timeouts,
    /// The loop's counters (requests, responses by status, durations).
    pub metrics: &'a LoopMetrics,
    /// Every response says `Connection: close` (the lame duck, an upgrade's grace).
    pub closing: bool,
}

impl Context<'_> {
    fn after(&self, timeout: Option<Duration>) -> Option<Instant> {
        timeout.map(|t| self.now + t)
    }
}

/// A request whose head has been read, waiting for its body or its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    routed: Routed,
    persistence: Persistence,
}

/// Where the connection is in its current request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reading {
    /// No byte of a request buffered. `first` for a fresh connection, whose deadline is the read
    /// timeout from the accept; otherwise the idle timeout. Leaves to `Head` on the first byte,
    /// or expires (408 for a fresh connection, a quiet close for a keep-alive one).
    Idle { first: bool, until: Option<Instant> },
    /// Part of a request head buffered. Leaves to `Body`, `Handling`, `Idle` (response queued,
    /// keep-alive) or `Done` (error, timeout, or last response).
    Head { until: Option<Instant> },
    /// Consuming the body of `request` (discarded). Leaves like `Head` once the body is complete.
    Body {
        request: Request,
        decoder: BodyDecoder,
        until: Option<Instant>,
    },
    /// The request is complete; its handler's response is due at `ready_at`. Leaves to `Idle`
    /// or `Done` once the response is queued. Further input is buffered, not parsed.
    Handling { request: Request, ready_at: Instant },
    /// The last response is queued: any further input is discarded. Terminal.
    Done,
}

/// What one call to [`Machine::advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Bytes taken off the front of the input (parsed, or discarded once `Done`).
    pub consumed: usize,
    /// The request error answered in this step, if any (for the log).
    pub error: Option<HttpError>,
}

/// What an expired deadline means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing of the machine's expired (a handler becoming ready is picked up by `advance`).
    Nothing,
    /// A keep-alive connection was idle too long: close it, no response.
    Idle,
    /// The request did not arrive in time: a 408 was queued and the machine is `Done`.
    RequestTimeout,
}

/// The state of one connection's request/response exchange.
#[derive(Debug, Clone)]
pub struct Machine {
    reading: Reading,
    /// Stream offset of the first input byte not yet consumed.
    consumed: u64,
    /// Stream offset the input had reached when the drain began: a request that starts before
    /// it was sent before the signal and is answered; the response to the last one says close.
    drain_mark: Option<u64>,
    /// The peer half-closed: no more input will come.
    peer_eof: bool,
    /// The machine answered an error or discarded input: unread input may still be in flight,
    /// so the socket must linger before it is closed (else the kernel sends RST).
    unread_input: bool,
    /// Responses queued so far.
    served: u64,
    /// When the current request's first byte arrived (the accept, before any): its response's
    /// duration is counted from here.
    started: Instant,
}

impl Machine {
    /// A machine for a connection accepted now.
    pub fn new(cx: &Context<'_>) -> Machine {
        Machine {
            reading: Reading::Idle {
                first: true,
                until: cx.after(cx.timeouts.read),
            },
            consumed: 0,
            drain_mark: None,
            peer_eof: false,
            unread_input: false,
            served: 0,
            started: cx.now,
        }
    }

    /// Parses and answers as much of `input` as can be acted on now, appending responses to
    /// `out` (which may already hold unsent responses). Stops at a partial request, a handler
    /// that is not ready, or when `out` is full.
    pub fn advance(&mut self, input: &[u8], out: &mut Vec<u8>, cx: &Context<'_>) -> Step {
        let mut pos = 0;
        let mut error = None;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            let result = match &mut self.reading {
                Reading::Done => {
                    if !rest.is_empty() {
                        self.unread_input = true;
                    }
                    pos = input.len();
                    break;
                }
                Reading::Idle { first, until } => {
                    if rest.is_empty() {
                        break;
                    }
                    let until = if *first {
                        *until
                    } else {
                        cx.after(cx.timeouts.read)
                    };
                    self.started = cx.now;
                    cx.metrics.request_received();
                    self.set(Reading::Head { until });
                    Ok(0)
                }
                Reading::Head { until } => {
                    if out.len() >= MAX_PENDING_OUTPUT_BYTES {
                        break;
                    }
                    let until = *until;
                    match parse_head(rest, cx.limits) {
                        Ok(None) => break,
                        Ok(Some(head)) => {
                            let request = Request {
                                routed: cx.app.route(head.method, head.target),
                                persistence: head.persistence,
                            };
                            let body_follows = rest.len() > head.len;
                            match BodyDecoder::new(head.framing) {
                                None => {
                                    self.consume(head.len);
                                    self.dispatch(request, body_follows, out, cx);
                                }
                                Some(decoder) => {
                                    if head.expects_continue && !body_follows {
                                        out.extend_from_slice(CONTINUE);
                                    }
                                    self.consume(head.len);
                                    self.set(Reading::Body {
                                        request,
                                        decoder,
                                        until,
                                    });
                                }
                            }
                            Ok(head.len)
                        }
                        Err(e) => Err(e),
                    }
                }
                Reading::Body { decoder, .. } => {
                    if rest.is_empty() {
                        break;
                    }
                    match decoder.decode(rest, cx.limits) {
                        Ok((taken, done)) => {
                            self.consume(taken);
                            if done {
                                if let Reading::Body { request, .. } = self.take() {
                                    let more = rest.len() > taken;
                                    self.dispatch(request, more, out, cx);
                                }
                            } else {
                                pos += taken;
                                break;
                            }
                            Ok(taken)
                        }
                        Err(e) => Err(e),
                    }
                }
                Reading::Handling { ready_at, .. } => {
                    if cx.now < *ready_at || out.len() >= MAX_PENDING_OUTPUT_BYTES {
                        break;
                    }
                    if let Reading::Handling { request, .. } = self.take() {
                        self.respond(request, !rest.is_empty(), out, cx);
                    }
                    Ok(0)
                }
            };
            match result {
                Ok(taken) => pos += taken,
                Err(e) => {
                    error = Some(e);
                    self.fail(e, out, cx);
                }
            }
        }
        Step {
            consumed: pos,
            error,
        }
    }

    /// Acts on an expired read or idle deadline.
    pub fn expire(&mut self, out: &mut Vec<u8>, cx: &Context<'_>) -> Expiry {
        let due = |until: &Option<Instant>| until.is_some_and(|u| u <= cx.now);
        match &self.reading {
            Reading::Idle {
                first: false,
                until,
            } if due(until) => Expiry::Idle,
            Reading::Idle { first: true, until } if due(until) => {
                // A new connection that never sent a byte still gets its 408: count it as a
                // request received too, so received and answered move together (/debug/vars).
                cx.metrics.request_received();
                self.fail(HttpError::Timeout, out, cx);
                Expiry::RequestTimeout
            }
            Reading::Head { until } | Reading::Body { until, .. } if due(until) => {
                self.fail(HttpError::Timeout, out, cx);
                Expiry::RequestTimeout
            }
            _ => Expiry::Nothing,
        }
    }

    /// The peer half-closed its side: a partial request can never complete and is dropped; a
    /// request in its handler is still answered.
    pub fn on_peer_eof(&mut self) {
        self.peer_eof = true;
        if !matches!(self.reading, Reading::Handling { .. }) {
            self.set(Reading::Done);
        }
    }

    /// The drain began when the input had reached stream offset `bytes_in`.
    pub fn begin_drain(&mut self, bytes_in: u64) {
        self.drain_mark = Some(bytes_in);
    }

    /// The machine's nearest deadline: read, idle, or a handler becoming ready.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.reading {
            Reading::Idle { until, .. } | Reading::Head { until } | Reading::Body { until, .. } => {
                *until
            }
            Reading::Handling { ready_at, .. } => Some(*ready_at),
            Reading::Done => None,
        }
    }

    /// No byte of a request is held and no handler runs.
    pub fn is_idle(&self) -> bool {
        matches!(self.reading, Reading::Idle { .. })
    }

    /// The last response has been queued (or the peer left): the connection closes once its
    /// output is written.
    pub fn is_done(&self) -> bool {
        matches!(self.reading, Reading::Done)
    }

    /// Input may still arrive that the machine will never read: close by lingering.
    pub fn has_unread_input(&self) -> bool {
        self.unread_input && !self.peer_eof
    }

    /// A short name of the state, for logs and the SIGQUIT dump.
    pub fn state_name(&self) -> &'static str {
        match self.reading {
            Reading::Idle { first: true, .. } => "new",
            Reading::Idle { first: false, .. } => "idle",
            Reading::Head { .. } => "reading-head",
            Reading::Body { .. } => "reading-body",
            Reading::Handling { .. } => "handling",
            Reading::Done => "done",
        }
    }

    /// Responses queued so far.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// The one place the state changes.
    fn set(&mut self, next: Reading) {
        self.reading = next;
    }

    /// Takes the current state out, leaving `Done` until the caller sets the next one.
    fn take(&mut self) -> Reading {
        mem::replace(&mut self.reading, Reading::Done)
    }

    fn consume(&mut self, bytes: usize) {
        self.consumed += bytes as u64;
    }

    /// A complete request goes to its handler, which answers now or names a deadline.
    fn dispatch(&mut self, request: Request, more: bool, out: &mut Vec<u8>, cx: &Context<'_>) {
        let delay = cx.app.delay(&request.routed.route);
        if delay.is_zero() {
            self.respond(request, more, out, cx);
        } else {
            self.set(Reading::Handling {
                request,
                ready_at: cx.now + delay,
            });
        }
    }

    /// Queues the response to `request`; `more` says whether input follows it. Persistence is
    /// decided here, as the head is encoded (habit 9).
    fn respond(&mut self, request: Request, more: bool, out: &mut Vec<u8>, cx: &Context<'_>) {
        let persistence = self.persistence(request.persistence, more, cx);
        let status = cx.app.respond(&request.routed, persistence, cx.date, out);
        self.count(status, cx);
        if persistence == Persistence::Close {
            self.set(Reading::Done);
        } else {
            self.set(Reading::Idle {
                first: false,
                until: cx.after(cx.timeouts.idle),
            });
        }
    }

    /// The client's wish, unless this is the last response: the peer left with nothing more
    /// buffered, the drain began before any byte of a further request arrived, or the loop is
    /// closing every connection as it answers (the lame duck).
    fn persistence(&self, wanted: Persistence, more: bool, cx: &Context<'_>) -> Persistence {
        let last = cx.closing
            || self.peer_eof && !more
            || self.drain_mark.is_some_and(|m| self.consumed >= m);
        if last { Persistence::Close } else { wanted }
    }

    /// Counts a queued response: the connection's tally and the loop's metrics (its duration
    /// is read off the clock now, so work done within one wake-up counts too).
    fn count(&mut self, status: Status, cx: &Context<'_>) {
        self.served += 1;
        let elapsed = Instant::now().saturating_duration_since(self.started);
        cx.metrics.responded(status.code(), elapsed);
    }

    /// Where the connection is, as the open-connections gauges see it.
    pub fn conn_state(&self) -> ConnState {
        match self.reading {
            Reading::Idle { .. } => ConnState::Idle,
            Reading::Head { .. } | Reading::Body { .. } => ConnState::Reading,
            Reading::Handling { .. } => ConnState::Handling,
            Reading::Done => ConnState::Writing,
        }
    }

    /// The ONE mapping from a request error to a response (habit 4): status, JSON body,
    /// `Connection: close`. Only called before anything of this request's response is queued.
    fn fail(&mut self, error: HttpError, out: &mut Vec<u8>, cx: &Context<'_>) {
        let (status, message) = error.response();
        let head = ResponseHead {
            status,
            persistence: Persistence::Close,
            allow: None,
            head_only: false,
        };
        encode(out, &head, cx.date, &ErrorBody { error: message });
        self.count(status, cx);
        self.unread_input = true;
        self.set(Reading::Done);
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
