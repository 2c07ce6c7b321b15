//! The state machine fed scripted bytes, split at every boundary.

use super::*;
use crate::config::Environment;

const DATE: &[u8] = b"Sun, 06 Nov 1994 08:49:37 GMT";

pub(super) struct Harness {
    app: App,
    limits: Limits,
    timeouts: Timeouts,
    now: Instant,
    pub(super) metrics: LoopMetrics,
}

impl Harness {
    pub(super) fn new(delay: Duration) -> Harness {
        Harness {
            app: App::api(Environment::Production, delay),
            limits: Limits::default(),
            timeouts: Timeouts {
                read: Some(Duration::from_secs(5)),
                idle: Some(Duration::from_secs(60)),
                write: Some(Duration::from_secs(10)),
            },
            now: Instant::now(),
            metrics: LoopMetrics::default(),
        }
    }

    pub(super) fn cx(&self) -> Context<'_> {
        Context {
            now: self.now,
            date: DATE,
            app: &self.app,
            limits: &self.limits,
            timeouts: &self.timeouts,
            metrics: &self.metrics,
            closing: false,
        }
    }

    /// Feeds the chunks one after another the way a connection does (unconsumed bytes stay
    /// buffered in front of the next chunk) and returns everything written.
    pub(super) fn feed(&self, machine: &mut Machine, chunks: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
        let mut buffered = Vec::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buffered.extend_from_slice(chunk);
            let step = machine.advance(&buffered, &mut out, &self.cx());
            buffered.drain(..step.consumed);
        }
        (out, buffered)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn statuses(out: &[u8]) -> Vec<String> {
    text(out)
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| r[..3].to_string())
        .collect()
}

const PIPELINE: &[u8] = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n\
POST /v1/healthcheck HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4;e=1\r\nbody\r\n0\r\nT: v\r\n\r\n\
PUT /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
HEAD /v1/healthcheck?x=1 HTTP/1.1\r\nHost: x\r\n\r\n\
GET /v1/healthcheck HTTP/1.0\r\n\r\n";

#[test]
fn pipelined_requests_split_at_every_boundary_get_identical_responses() {
    let h = Harness::new(Duration::ZERO);
    let (whole, rest) = h.feed(&mut Machine::new(&h.cx()), &[PIPELINE]);
    assert!(rest.is_empty());
    assert_eq!(statuses(&whole), ["200", "405", "404", "200", "200"]);
    let last_body = format!(
        "Connection: close\r\n\r\n{{\n  \"status\": \"available\",\n  \"system_info\": {{\n    \"environment\": \"production\",\n    \"version\": \"{}\"\n  }}\n}}\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text(&whole).ends_with(&last_body));

    for split in 0..=PIPELINE.len() {
        let mut machine = Machine::new(&h.cx());
        let (out, _) = h.feed(&mut machine, &[&PIPELINE[..split], &PIPELINE[split..]]);
        assert_eq!(text(&out), text(&whole), "split at {split}");
        assert!(
            machine.is_done(),
            "HTTP/1.0 without keep-alive ends the connection"
        );
    }
    let bytes: Vec<&[u8]> = PIPELINE.chunks(1).collect();
    let (out, _) = h.feed(&mut Machine::new(&h.cx()), &bytes);
    assert_eq!(text(&out), text(&whole), "byte by byte");
}

#[test]
fn a_fresh_connection_is_idle_until_its_first_byte() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    assert!(machine.is_idle());
    assert_eq!(machine.deadline(), Some(h.now + Duration::from_secs(5)));
    h.feed(&mut machine, &[b"G"]);
    assert!(!machine.is_idle());
    assert_eq!(machine.state_name(), "reading-head");
}

#[test]
fn keep_alive_response_returns_to_idle_with_the_idle_deadline() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    let (out, _) = h.feed(
        &mut machine,
        &[b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"],
    );
    assert!(!text(&out).contains("Connection:"));
    assert!(machine.is_idle());
    assert_eq!(machine.deadline(), Some(h.now + Duration::from_secs(60)));
}

#[test]
fn half_request_when_the_drain_begins_is_answered_with_connection_close() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    let first = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/health";
    let (out, rest) = h.feed(&mut machine, &[first]);
    assert_eq!(statuses(&out), ["200"]);
    machine.begin_drain(first.len() as u64);
    let mut buffered = rest;
    buffered.extend_from_slice(b"check HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = Vec::new();
    machine.advance(&buffered, &mut out, &h.cx());
    assert_eq!(statuses(&out), ["200"]);
    assert!(text(&out).contains("Connection: close\r\n"));
    assert!(machine.is_done());
}

#[test]
fn requests_sent_before_the_drain_are_all_answered_and_only_the_last_says_close() {
    let h = Harness::new(Duration::ZERO);
    let request: &[u8] = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n";
    let three = [request, request, request].concat();
    let mut machine = Machine::new(&h.cx());
    machine.begin_drain(three.len() as u64);
    let (out, _) = h.feed(&mut machine, &[&three, request]);
    assert_eq!(
        statuses(&out),
        ["200", "200", "200"],
        "the request after the mark is not answered"
    );
    assert_eq!(text(&out).matches("Connection: close").count(), 1);
    assert!(text(&out).trim_end().ends_with('}'));
    assert!(
        machine.has_unread_input(),
        "bytes after the last response force a lingering close"
    );
}

#[test]
fn slow_handler_defers_its_response_and_keeps_pipelined_order() {
    let h = Harness::new(Duration::from_secs(4));
    let mut machine = Machine::new(&h.cx());
    let script =
        b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
    let (out, rest) = h.feed(&mut machine, &[script]);
    assert!(
        out.is_empty(),
        "nothing is answered before the handler is ready"
    );
    assert_eq!(machine.state_name(), "handling");
    assert_eq!(machine.deadline(), Some(h.now + Duration::from_secs(4)));

    let later = Harness {
        now: h.now + Duration::from_secs(4),
        ..Harness::new(Duration::from_secs(4))
    };
    let mut out = Vec::new();
    let step = machine.advance(&rest, &mut out, &later.cx());
    assert_eq!(step.consumed, rest.len());
    assert_eq!(statuses(&out), ["200", "404"]);
}

#[test]
fn read_timeout_answers_408_and_idle_timeout_closes_quietly() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    h.feed(&mut machine, &[b"GET /v1/health"]);
    let mut out = Vec::new();
    assert_eq!(
        machine.expire(&mut out, &h.cx()),
        Expiry::Nothing,
        "not due yet"
    );
    let late = Harness {
        now: h.now + Duration::from_secs(5),
        ..Harness::new(Duration::ZERO)
    };
    assert_eq!(machine.expire(&mut out, &late.cx()), Expiry::RequestTimeout);
    assert_eq!(statuses(&out), ["408"]);
    assert!(text(&out).contains("Connection: close"));
    assert!(machine.is_done());

    let mut machine = Machine::new(&h.cx());
    h.feed(
        &mut machine,
        &[b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"],
    );
    let idle = Harness {
        now: h.now + Duration::from_secs(60),
        ..Harness::new(Duration::ZERO)
    };
    let mut out = Vec::new();
    assert_eq!(machine.expire(&mut out, &idle.cx()), Expiry::Idle);
    assert!(out.is_empty());
}

#[test]
fn a_fresh_connection_that_never_speaks_gets_408_at_the_read_timeout() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    let late = Harness {
        now: h.now + Duration::from_secs(5),
        ..Harness::new(Duration::ZERO)
    };
    let mut out = Vec::new();
    assert_eq!(machine.expire(&mut out, &late.cx()), Expiry::RequestTimeout);
    assert_eq!(statuses(&out), ["408"]);
}

#[test]
fn bad_request_is_answered_once_and_what_follows_is_discarded() {
    let h = Harness::new(Duration::ZERO);
    let script = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n";
    for split in 0..=script.len() {
        let mut machine = Machine::new(&h.cx());
        let (out, rest) = h.feed(&mut machine, &[&script[..split], &script[split..]]);
        assert_eq!(statuses(&out), ["400"], "split at {split}");
        assert!(rest.is_empty());
        assert!(machine.is_done());
        assert!(machine.has_unread_input());
    }
}

#[test]
fn expect_100_continue_gets_an_interim_response_before_the_body() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    let head = b"POST /v1/healthcheck HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
    let (out, _) = h.feed(&mut machine, &[head]);
    assert_eq!(text(&out), "HTTP/1.1 100 Continue\r\n\r\n");
    let (out, _) = h.feed(&mut machine, &[b"body"]);
    assert_eq!(statuses(&out), ["405"]);

    let mut machine = Machine::new(&h.cx());
    let (out, _) = h.feed(&mut machine, &[&[&head[..], b"body"].concat()]);
    assert_eq!(
        statuses(&out),
        ["405"],
        "no 100 when the body is already here"
    );
}

#[test]
fn peer_eof_after_a_complete_request_still_gets_the_answer_then_close() {
    let h = Harness::new(Duration::from_secs(1));
    let mut machine = Machine::new(&h.cx());
    h.feed(
        &mut machine,
        &[b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"],
    );
    machine.on_peer_eof();
    let ready = Harness {
        now: h.now + Duration::from_secs(1),
        ..Harness::new(Duration::from_secs(1))
    };
    let mut out = Vec::new();
    machine.advance(&[], &mut out, &ready.cx());
    assert_eq!(statuses(&out), ["200"]);
    assert!(text(&out).contains("Connection: close"));
    assert!(machine.is_done());
    assert!(!machine.has_unread_input());
}

#[test]
fn peer_eof_mid_head_abandons_the_request() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    let (out, _) = h.feed(&mut machine, &[b"GET /v1/hea"]);
    machine.on_peer_eof();
    assert!(out.is_empty());
    assert!(machine.is_done());
}

#[test]
fn output_backlog_stops_taking_requests() {
    let h = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&h.cx());
    let request: &[u8] = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n";
    let many = request.repeat(2000);
    let mut out = Vec::new();
    let step = machine.advance(&many, &mut out, &h.cx());
    assert!(step.consumed < many.len());
    assert!(out.len() >= MAX_PENDING_OUTPUT_BYTES);
    assert!(out.len() < MAX_PENDING_OUTPUT_BYTES + 1024);
}

#[test]
fn every_response_counts_once_with_its_status_and_every_request_once() {
    let harness = Harness::new(Duration::ZERO);
    let mut machine = Machine::new(&harness.cx());
    let get = b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n";
    let missing = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
    let input = [&get[..], &missing[..], &get[..], b"GET / HTTP/1.1\r\n\r\n"].concat();
    harness.feed(&mut machine, &[&input[..7], &input[7..]]);
    let counted = harness.metrics.snapshot();
    assert_eq!(counted.requests_received, 4);
    assert_eq!(counted.responses[0], 2, "200");
    assert_eq!(counted.responses[2], 1, "404");
    assert_eq!(counted.responses[1], 1, "400 for the missing Host");
    assert_eq!(counted.responses_sent(), 4);
    assert_eq!(counted.duration_buckets.iter().sum::<u64>(), 4);
}
