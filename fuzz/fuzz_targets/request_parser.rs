//! Fuzzes the request parser, the body decoder and the connection state machine: any bytes,
//! split at a point the input chooses, must never panic, and a split must not change the
//! answer to a well-formed pipeline.
#![no_main]

use std::time::{Duration, Instant};

use greenlight::app::App;
use greenlight::config::Environment;
use greenlight::conn::{Context, Machine, Timeouts};
use greenlight::http::{BodyDecoder, Limits, parse_head};
use libfuzzer_sys::fuzz_target;

fn run(cx: &Context<'_>, input: &[u8], cut: usize) -> Vec<u8> {
    let mut machine = Machine::new(cx);
    let mut buffered = Vec::new();
    let mut out = Vec::new();
    for piece in [&input[..cut], &input[cut..]] {
        buffered.extend_from_slice(piece);
        let step = machine.advance(&buffered, &mut out, cx);
        assert!(step.consumed <= buffered.len());
        buffered.drain(..step.consumed);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    if let Ok(Some(head)) = parse_head(input, &limits) {
        assert!(head.len <= input.len());
        if let Some(mut decoder) = BodyDecoder::new(head.framing) {
            if let Ok((consumed, _)) = decoder.decode(&input[head.len..], &limits) {
                assert!(consumed <= input.len() - head.len);
            }
        }
    }

    let app = App::api(Environment::Development, Duration::ZERO);
    let timeouts = Timeouts {
        read: Some(Duration::from_secs(5)),
        idle: Some(Duration::from_secs(60)),
        write: Some(Duration::from_secs(10)),
    };
    let metrics = greenlight::metrics::LoopMetrics::default();
    let cx = Context {
        now: Instant::now(),
        date: b"Sun, 06 Nov 1994 08:49:37 GMT",
        app: &app,
        limits: &limits,
        timeouts: &timeouts,
        metrics: &metrics,
        closing: false,
    };
    let cut = usize::from(selector) * input.len() / 255;
    let split = run(&cx, input, cut);
    let whole = run(&cx, input, input.len());
    // A split may change which limit trips first on garbage, never the answer to valid input.
    if !whole.windows(15).any(|w| w.starts_with(b"HTTP/1.1 4") || w.starts_with(b"HTTP/1.1 5")) {
        assert_eq!(split, whole);
    }
});
