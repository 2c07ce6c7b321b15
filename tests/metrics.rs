//! `/metrics` and `/debug/vars` on the admin listener: exact counts after exactly N requests of
//! each kind, gauges that follow connections between states, and the two views agreeing.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use support::*;

/// Every sample of a scrape: `name{labels}` -> value.
fn scrape(admin: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let response = get(admin, "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(response.body).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

fn spawn_with_admin(extra: &[&str]) -> (Server, std::net::SocketAddr) {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--admin-addr", admin.as_str()];
    args.extend_from_slice(extra);
    let mut server = spawn_server(&args);
    let admin = admin_addr(&mut server);
    (server, admin)
}

/// Scrapes until `check` holds (the server counts as it goes; a scrape may land mid-change).
fn scrape_until(
    admin: std::net::SocketAddr,
    check: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let end = Instant::now() + PROMPTLY;
    loop {
        let samples = scrape(admin);
        if check(&samples) {
            return samples;
        }
        assert!(Instant::now() < end, "never held: {samples:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn counters_move_by_exactly_n_for_n_requests_of_each_kind() {
    const N: usize = 7;
    let (mut server, admin) = spawn_with_admin(&["--read-timeout", "200ms"]);
    let before = scrape(admin);
    assert_eq!(
        value(&before, "greenlight_requests_total{code=\"200\"}"),
        0.0
    );
    let kinds: [(&[u8], u16); 5] = [
        (HEALTHCHECK, 200),
        (b"GET /v1/movies HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"DELETE /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /v1/healthcheck HTTP/1.1\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n",
            413,
        ),
    ];
    for (raw, status) in kinds {
        for _ in 0..N {
            assert_eq!(exchange(&server, raw).status, status);
        }
    }
    for _ in 0..N {
        let mut stream = server.connect();
        stream.write_all(b"GET /v1/health").unwrap();
        assert_eq!(read_response(&mut stream).status, 408);
    }
    // A connection that never sends a byte gets its 408 too, and counts as a request received.
    for _ in 0..N {
        let mut stream = server.connect();
        assert_eq!(read_response(&mut stream).status, 408);
    }
    let n = N as f64;
    let samples = scrape_until(admin, |s| {
        s.get("greenlight_connections_closed_total{reason=\"read_timeout\"}") == Some(&(2.0 * n))
    });
    for code in [200, 404, 405, 400, 408, 413] {
        let sent = if code == 408 { 2.0 * n } else { n };
        assert_eq!(
            value(
                &samples,
                &format!("greenlight_requests_total{{code=\"{code}\"}}")
            ),
            sent,
            "{code}"
        );
    }
    for code in [400, 408, 413] {
        let sent = if code == 408 { 2.0 * n } else { n };
        assert_eq!(
            value(
                &samples,
                &format!("greenlight_http_errors_total{{code=\"{code}\"}}")
            ),
            sent,
            "{code}"
        );
    }
    assert_eq!(
        value(&samples, "greenlight_http_errors_total{code=\"414\"}"),
        0.0
    );
    let total = 7.0 * n;
    assert_eq!(
        value(&samples, "greenlight_request_duration_seconds_count"),
        total
    );
    assert_eq!(
        value(
            &samples,
            "greenlight_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        total
    );
    assert_eq!(value(&samples, "greenlight_requests_received_total"), total);
    assert_eq!(
        value(&samples, "greenlight_connections_accepted_total"),
        total
    );
    assert_eq!(value(&samples, "greenlight_requests_in_flight"), 0.0);
    assert_eq!(value(&samples, "greenlight_draining"), 0.0);
    let workers = server.wait_for_log("starting server", PROMPTLY).unwrap()["workers"].as_f64();
    assert_eq!(Some(value(&samples, "greenlight_workers")), workers);
    assert!(
        samples
            .keys()
            .any(|k| k.starts_with("greenlight_build_info{version="))
    );
    // CPU time is counted in clock ticks: a young process may show 0.
    assert!(value(&samples, "process_cpu_seconds_total") >= 0.0);
    for family in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(value(&samples, family) > 0.0, "{family}");
    }
    // The scrapes themselves are admin requests, counted apart from the API's.
    assert!(value(&samples, "greenlight_admin_requests_total{code=\"200\"}") >= 1.0);
}

#[test]
fn gauges_follow_connections_through_idle_reading_and_writing() {
    let (server, admin) = spawn_with_admin(&["--healthcheck-delay", "2s"]);
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut stream = server.connect();
        stream
            .write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut stream).status, 404);
        idle.push(stream);
    }
    let mut reading = Vec::new();
    for _ in 0..2 {
        let mut stream = server.connect();
        stream
            .write_all(b"GET /v1/healthcheck HTTP/1.1\r\nHo")
            .unwrap();
        reading.push(stream);
    }
    let mut handling = server.connect();
    handling.write_all(HEALTHCHECK).unwrap();
    let samples = scrape_until(admin, |s| {
        s.get("greenlight_connections_open{state=\"reading\"}") == Some(&2.0)
            && s.get("greenlight_connections_open{state=\"writing\"}") == Some(&1.0)
    });
    assert_eq!(
        value(&samples, "greenlight_connections_open{state=\"idle\"}"),
        3.0
    );
    assert_eq!(value(&samples, "greenlight_requests_in_flight"), 3.0);
    let per_worker: f64 = samples
        .iter()
        .filter(|(k, _)| k.starts_with("greenlight_worker_connections_open{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(per_worker, 6.0, "the per-worker gauges add up");

    // Everyone leaves: the gauges fall back to zero and the closes are counted by reason.
    drop((idle, reading, handling));
    let samples = scrape_until(admin, |s| {
        s.get("greenlight_connections_open{state=\"idle\"}") == Some(&0.0)
            && s.get("greenlight_connections_open{state=\"reading\"}") == Some(&0.0)
            && s.get("greenlight_connections_open{state=\"writing\"}") == Some(&0.0)
    });
    assert_eq!(value(&samples, "greenlight_requests_in_flight"), 0.0);
    let closed: f64 = samples
        .iter()
        .filter(|(k, _)| k.starts_with("greenlight_connections_closed_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(closed, 6.0);
}

#[test]
fn debug_vars_matches_metrics() {
    let (server, admin) = spawn_with_admin(&[]);
    for _ in 0..5 {
        assert_eq!(exchange(&server, HEALTHCHECK).status, 200);
    }
    assert_eq!(
        exchange(&server, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").status,
        404
    );
    // Each client closed its connection; wait until the server has seen the last close.
    let end = Instant::now() + PROMPTLY;
    let vars = loop {
        let response = get(admin, "/debug/vars");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("application/json"));
        let vars = response.json();
        if vars["connections_open"] == 0 {
            break vars;
        }
        assert!(Instant::now() < end, "{vars}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let samples = scrape(admin);
    assert_eq!(vars["total_responses_sent"], 6);
    assert_eq!(vars["total_requests_received"], 6);
    assert_eq!(vars["total_responses_sent_by_status"]["200"], 5);
    assert_eq!(vars["total_responses_sent_by_status"]["404"], 1);
    assert_eq!(
        vars["total_responses_sent_by_status"]["200"]
            .as_f64()
            .unwrap(),
        value(&samples, "greenlight_requests_total{code=\"200\"}")
    );
    let sum_us = value(&samples, "greenlight_request_duration_seconds_sum") * 1e6;
    let vars_us = vars["total_processing_time_μs"].as_f64().unwrap();
    assert!((sum_us - vars_us).abs() < 1.0, "{sum_us} vs {vars_us}");
    assert_eq!(
        vars["workers"].as_f64().unwrap(),
        value(&samples, "greenlight_workers")
    );
    assert_eq!(vars["connections_open"], 0);
    assert!(vars["version"].is_string() && vars["timestamp"].is_u64());
}

#[test]
fn the_phase_shows_once_the_shutdown_begins() {
    let (mut server, admin) = spawn_with_admin(&["--drain-delay", "30s"]);
    server.terminate();
    let samples = scrape(admin);
    assert_eq!(value(&samples, "greenlight_draining"), 1.0);
    assert!(value(&samples, "greenlight_shutdown_started_timestamp_seconds") > 1.6e9);
    assert_eq!(
        value(&samples, "greenlight_drain_duration_seconds"),
        0.0,
        "the lame duck is not the drain"
    );
}

#[test]
fn a_connection_over_the_limit_is_counted_as_closed_over_the_limit() {
    let (server, admin) = spawn_with_admin(&["--max-connections", "1"]);
    let mut held = server.connect();
    held.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut held).status, 200);
    let mut over = server.connect();
    let _ = over.write_all(HEALTHCHECK);
    assert!(read_response_from(&mut over, false).is_err());
    let samples = scrape(admin);
    assert_eq!(
        value(
            &samples,
            "greenlight_connections_closed_total{reason=\"over_limit\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&samples, "greenlight_connections_accepted_total"),
        2.0
    );
    assert_eq!(value(&samples, "greenlight_max_connections"), 1.0);
}
