//! Property tests: random and mutated requests, split at random points, fed to the parser and
//! the connection state machine.

use proptest::prelude::*;

use super::tests::Harness;
use super::*;

/// Feeds `input` cut at `cuts` (positions, any order, may repeat) as a connection would and
/// returns everything written.
fn run(input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let harness = Harness::new(Duration::ZERO);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for end in points {
        chunks.push(&input[start..end]);
        start = end;
    }
    let mut machine = Machine::new(&harness.cx());
    harness.feed(&mut machine, &chunks).0
}

/// Splits output into responses; panics if it is not a clean sequence of them.
fn responses(out: &[u8]) -> Vec<(u16, bool)> {
    let mut rest = out;
    let mut found = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete response head")
            + 4;
        let head = std::str::from_utf8(&rest[..end]).expect("an ASCII head");
        let status: u16 = head[9..12].parse().expect("a status code");
        let closes = head.contains("\r\nConnection: close\r\n");
        let length = if status == 100 {
            0
        } else {
            head.lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("Content-Length")
                .parse::<usize>()
                .unwrap()
        };
        assert!(rest.len() >= end + length, "a complete body");
        found.push((status, closes));
        rest = &rest[end + length..];
    }
    found
}

fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9-]{1,12}"
}

/// One valid HTTP/1.1 request that keeps the connection open.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("OPTIONS")
    ];
    let target = prop_oneof![
        Just("/v1/healthcheck".to_string()),
        Just("/v1/healthcheck?verbose=true".to_string()),
        Just("/".to_string()),
        token().prop_map(|t| format!("/v1/{t}")),
    ];
    let extra = proptest::collection::vec((token(), token()), 0..4);
    let body = prop_oneof![
        Just(None),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Some((false, b))),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Some((true, b))),
    ];
    (method, target, extra, body).prop_map(|(method, target, extra, body)| {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: example.com\r\n").into_bytes();
        for (name, value) in extra {
            raw.extend_from_slice(format!("X-{name}: {value}\r\n").as_bytes());
        }
        match body {
            None => raw.extend_from_slice(b"\r\n"),
            Some((false, bytes)) => {
                raw.extend_from_slice(
                    format!("Content-Length: {}\r\n\r\n", bytes.len()).as_bytes(),
                );
                raw.extend_from_slice(&bytes);
            }
            Some((true, bytes)) => {
                raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for chunk in bytes.chunks(7) {
                    raw.extend_from_slice(format!("{:x};ext=1\r\n", chunk.len()).as_bytes());
                    raw.extend_from_slice(chunk);
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(b"0\r\nTrailer: x\r\n\r\n");
            }
        }
        raw
    })
}

fn pipeline() -> impl Strategy<Value = (Vec<u8>, usize)> {
    proptest::collection::vec(request(), 1..6)
        .prop_map(|requests| (requests.concat(), requests.len()))
}

/// A byte edit: overwrite, insert or delete at a position.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![
        any::<u8>(),
        Just(b'\r'),
        Just(b'\n'),
        Just(b' '),
        Just(b':'),
        Just(b'0')
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn mutate(mut input: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match *m {
            Mutation::Set(i, b) if !input.is_empty() => {
                let i = i % input.len();
                input[i] = b;
            }
            Mutation::Insert(i, b) => {
                let i = i % (input.len() + 1);
                input.insert(i, b);
            }
            Mutation::Delete(i) if !input.is_empty() => {
                let i = i % input.len();
                input.remove(i);
            }
            _ => {}
        }
    }
    input
}

/// Once a response says close, nothing follows it; each request gets at most one response.
fn check_invariants(input: &[u8], out: &[u8]) {
    let found = responses(out);
    let finals: Vec<_> = found.iter().filter(|(status, _)| *status != 100).collect();
    if let Some(first_close) = finals.iter().position(|(_, closes)| *closes) {
        assert_eq!(
            first_close,
            finals.len() - 1,
            "a response after Connection: close"
        );
    }
    let heads = input.windows(4).filter(|w| *w == b"\r\n\r\n").count();
    assert!(
        finals.len() <= heads + 1,
        "{} responses for at most {heads} requests",
        finals.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_pipelines_are_answered_identically_however_split(
        (input, count) in pipeline(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = run(&input, &[]);
        let split = run(&input, &cuts);
        prop_assert_eq!(&split, &whole);
        let found = responses(&whole);
        prop_assert_eq!(found.len(), count);
        prop_assert!(found.iter().all(|(status, closes)| [200, 404, 405].contains(status) && !closes));
    }

    #[test]
    fn mutated_pipelines_never_panic_or_answer_twice(
        (input, _) in pipeline(),
        mutations in proptest::collection::vec(mutation(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let input = mutate(input, &mutations);
        let out = run(&input, &cuts);
        check_invariants(&input, &out);
    }

    #[test]
    fn random_bytes_never_panic_or_answer_twice(
        input in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let out = run(&input, &cuts);
        check_invariants(&input, &out);
    }
}
