//! The HTTP contract, from outside: routes, errors, framing, persistence, pipelining.

mod support;

use std::io::Write;

use support::*;

fn assert_standard_headers(response: &Response) {
    assert!(
        response.header("date").is_some_and(|d| d.ends_with(" GMT")),
        "{response:?}"
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{response:?}"
    );
    assert!(response.header("content-length").is_some(), "{response:?}");
}

fn assert_json_error(response: &Response, status: u16) {
    assert_eq!(response.status, status, "{response:?}");
    assert_standard_headers(response);
    assert!(response.json()["error"].is_string(), "{response:?}");
}

#[test]
fn healthcheck_reports_available_with_environment_and_version() {
    let server = spawn_server(&["--env", "staging"]);
    let response = exchange(&server, HEALTHCHECK);
    assert_eq!(response.status, 200);
    assert_standard_headers(&response);
    assert_eq!(
        response.json(),
        serde_json::json!({
            "status": "available",
            "system_info": {"environment": "staging", "version": env!("CARGO_PKG_VERSION")}
        })
    );
    let text = String::from_utf8(response.body.clone()).unwrap();
    assert!(text.contains("\n  \"status\""), "pretty-printed: {text:?}");
    assert!(text.ends_with("}\n"));
}

#[test]
fn head_healthcheck_has_get_headers_and_no_body() {
    let server = spawn_server(&[]);
    let get = exchange(&server, HEALTHCHECK);
    let mut stream = server.connect();
    stream
        .write_all(b"HEAD /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = read_response_from(&mut stream, true).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), get.header("content-length"));
    // The next response on the same connection starts right away: no body was sent.
    stream.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut stream).json(), get.json());
}

#[test]
fn unknown_path_is_404_json() {
    let server = spawn_server(&[]);
    let response = exchange(&server, b"GET /v1/movies HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_json_error(&response, 404);
    assert_eq!(
        response.json()["error"],
        "the requested resource could not be found"
    );
}

#[test]
fn other_method_is_405_with_allow() {
    let server = spawn_server(&[]);
    let response = exchange(
        &server,
        b"DELETE /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_json_error(&response, 405);
    assert_eq!(response.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        response.json()["error"],
        "the DELETE method is not supported for this resource"
    );
}

/// Each malformed request gets its status as JSON, with Connection: close, and the
/// connection really closes afterwards.
#[test]
fn protocol_errors_are_json_and_close_the_connection() {
    let server = spawn_server(&[]);
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(17000)
    );
    let rows: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"\x16\x03\x01garbage\r\n\r\n".to_vec(), 400),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n".to_vec(), 400),
        ("missing host", b"GET /v1/healthcheck HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("CL and TE", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 400),
        ("conflicting CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n".to_vec(), 400),
        ("signed CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n".to_vec(), 400),
        ("bad chunk", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(), 400),
        ("TE not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n".to_vec(), 400),
        ("body too large", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n".to_vec(), 413),
        ("uri too long", long_target.into_bytes(), 414),
        ("header too large", big_header.into_bytes(), 431),
        ("expectation", b"GET / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n".to_vec(), 417),
        ("http/2.0", b"GET /v1/healthcheck HTTP/2.0\r\nHost: x\r\n\r\n".to_vec(), 505),
        ("http/1.2", b"GET /v1/healthcheck HTTP/1.2\r\nHost: x\r\n\r\n".to_vec(), 505),
        ("TE.CL", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".to_vec(), 400),
        ("TE.TE chunked, identity", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE.TE two headers", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE.TE space before colon", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE.TE tab before colon", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(), 501),
        ("LF-only last chunk hides a request", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\n\nGET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("LF-only head", b"GET /v1/healthcheck HTTP/1.1\nHost: x\n\n".to_vec(), 400),
        ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n".to_vec(), 400),
        ("CL with space inside", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 0\r\n\r\n".to_vec(), 400),
        ("CL overflow", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 184467440737095516160\r\n\r\n".to_vec(), 400),
        ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n".to_vec(), 400),
        ("endless chunk extension", format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;{}", "e".repeat(2000)).into_bytes(), 400),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), 400),
    ];
    for (name, raw, status) in rows {
        let mut stream = server.connect();
        stream.write_all(&raw).unwrap();
        let response = read_response(&mut stream);
        assert_json_error(&response, status);
        assert!(response.closes(), "{name}: {response:?}");
        // Whatever follows on this connection is never treated as a request.
        let _ = stream.write_all(HEALTHCHECK);
        let rest = read_to_close(&mut stream).unwrap_or_default();
        assert!(
            rest.is_empty(),
            "{name}: answered after the error: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

#[test]
fn body_too_large_is_answered_from_the_head_without_the_body() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    stream
        .write_all(b"POST /v1/healthcheck HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        .unwrap();
    let response = read_response(&mut stream);
    assert_json_error(&response, 413);
}

#[test]
fn keep_alive_is_the_default_on_http11() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    for _ in 0..3 {
        stream.write_all(HEALTHCHECK).unwrap();
        let response = read_response(&mut stream);
        assert_eq!(response.status, 200);
        assert!(!response.closes());
    }
}

#[test]
fn connection_close_is_honoured() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    stream
        .write_all(b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let response = read_response(&mut stream);
    assert!(response.closes());
    assert!(read_to_close(&mut stream).unwrap().is_empty());
}

#[test]
fn http10_closes_unless_keep_alive_is_asked_for() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    stream
        .write_all(b"GET /v1/healthcheck HTTP/1.0\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut stream).closes());
    assert!(read_to_close(&mut stream).unwrap().is_empty());

    let mut stream = server.connect();
    for _ in 0..2 {
        stream
            .write_all(b"GET /v1/healthcheck HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let response = read_response(&mut stream);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    let mut batch = Vec::new();
    batch.extend_from_slice(HEALTHCHECK);
    batch.extend_from_slice(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    batch.extend_from_slice(
        b"POST /v1/healthcheck HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    );
    batch.extend_from_slice(b"PUT /v1/healthcheck HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    batch.extend_from_slice(HEALTHCHECK);
    stream.write_all(&batch).unwrap();
    let statuses: Vec<u16> = (0..5).map(|_| read_response(&mut stream).status).collect();
    assert_eq!(statuses, [200, 404, 405, 405, 200]);
}

#[test]
fn expect_100_continue_is_honoured() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    stream
        .write_all(b"POST /v1/healthcheck HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    let interim = read_response_from(&mut stream, true).unwrap();
    assert_eq!(interim.status, 100);
    stream.write_all(b"hello").unwrap();
    assert_eq!(read_response(&mut stream).status, 405);
    stream.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut stream).status, 200);
}

#[test]
fn read_timeout_answers_408_then_closes() {
    let server = spawn_server(&["--read-timeout", "300ms"]);
    let mut stream = server.connect();
    stream
        .write_all(b"GET /v1/healthcheck HTTP/1.1\r\nHost:")
        .unwrap();
    let response = read_response(&mut stream);
    assert_json_error(&response, 408);
    assert!(response.closes());
    assert!(read_to_close(&mut stream).unwrap().is_empty());
}

#[test]
fn idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let server = spawn_server(&["--idle-timeout", "300ms"]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    assert_eq!(read_response(&mut stream).status, 200);
    assert!(
        read_to_close(&mut stream).unwrap().is_empty(),
        "closed without a response"
    );
}

#[test]
fn write_timeout_closes_a_client_that_never_reads() {
    let mut server = spawn_server(&["--write-timeout", "500ms", "--log-level", "debug"]);
    // A small receive buffer so the server's output backs up quickly.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    let batch = HEALTHCHECK.repeat(100_000);
    // The server stops taking requests once its output backs up, so our write blocks: write
    // from a thread, which fails once the server closes.
    let mut writer = stream.try_clone().unwrap();
    let handle = std::thread::spawn(move || {
        let _ = writer.write_all(&batch);
    });
    let closed = server
        .wait_for_log("closed", PROMPTLY)
        .expect("the connection is closed");
    assert_eq!(closed["reason"], "write timeout");
    drop(stream.shutdown(std::net::Shutdown::Both));
    handle.join().unwrap();
    // The loop is still serving others.
    assert_eq!(exchange(&server, HEALTHCHECK).status, 200);
}

#[test]
fn a_pipeline_deeper_than_the_output_backlog_is_answered_completely() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    let count = 5_000;
    let mut writer = stream.try_clone().unwrap();
    let handle = std::thread::spawn(move || writer.write_all(&HEALTHCHECK.repeat(count)));
    for i in 0..count {
        let response = read_response_from(&mut stream, false)
            .unwrap_or_else(|_| panic!("response {i} of {count} never came"));
        assert_eq!(response.status, 200);
    }
    handle.join().unwrap().unwrap();
}

#[test]
fn limit_flags_tune_414_431_and_413() {
    let server = spawn_server(&[
        "--max-request-line",
        "300",
        "--max-header-bytes",
        "1024",
        "--max-body-bytes",
        "10",
    ]);
    let rows: Vec<(Vec<u8>, u16)> = vec![
        (
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300)).into_bytes(),
            414,
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
                "b".repeat(1100)
            )
            .into_bytes(),
            431,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n".to_vec(),
            413,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n".to_vec(),
            413,
        ),
    ];
    for (raw, status) in rows {
        let response = exchange(&server, &raw);
        assert_json_error(&response, status);
    }
    // Just under each limit is fine.
    let ok = format!(
        "POST /v1/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789",
        "a".repeat(200)
    );
    assert_eq!(exchange(&server, ok.as_bytes()).status, 404);
}

#[test]
fn a_request_followed_by_a_half_close_is_still_answered() {
    let server = spawn_server(&[]);
    let mut stream = server.connect();
    stream.write_all(HEALTHCHECK).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 200);
    // Whether the FIN arrived before the answer was encoded (then it says close) is a race;
    // either way the server closes once it sees it.
    assert!(read_to_close(&mut stream).unwrap().is_empty());
}

#[test]
fn serves_ipv6_loopback() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        return; // no IPv6 on this machine: nothing to check
    };
    drop(probe);
    let mut server = spawn_server(&["--host", "::1"]);
    let started = server.wait_for_log("starting server", PROMPTLY).unwrap();
    assert!(
        started["addr"].as_str().unwrap().starts_with("[::1]:"),
        "{started}"
    );
    assert_eq!(exchange(&server, HEALTHCHECK).status, 200);
}
