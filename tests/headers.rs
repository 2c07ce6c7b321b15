//! Every response greenlight writes, success and error alike, carries the headers that keep it
//! out of caches and out of frames (OWASP's REST Security Cheat Sheet), and no `Server` header.

mod support;

use std::io::Write;

use support::*;

/// The headers and their exact values.
const EXPECTED: [(&str, &str); 4] = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
];

fn assert_headers(name: &str, response: &Response, status: u16) {
    assert_eq!(response.status, status, "{name}: {response:?}");
    for (header, value) in EXPECTED {
        assert_eq!(
            response.header(header),
            Some(value),
            "{name}: {header} in {response:?}"
        );
        let count = response
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(header))
            .count();
        assert_eq!(count, 1, "{name}: one {header}");
    }
    assert_eq!(response.header("server"), None, "{name}: no Server header");
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{name}"
    );
}

#[test]
fn every_status_greenlight_sends_carries_the_security_headers() {
    let server = spawn_server(&[]);
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(17000)
    );
    let rows: Vec<(&str, Vec<u8>, u16)> = vec![
        ("200 GET", HEALTHCHECK.to_vec(), 200),
        (
            "404",
            b"GET /v1/movies HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            404,
        ),
        (
            "405",
            b"DELETE /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            405,
        ),
        ("400", b"GET /v1/healthcheck HTTP/1.1\r\n\r\n".to_vec(), 400),
        (
            "413",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n".to_vec(),
            413,
        ),
        ("414", long_target.into_bytes(), 414),
        (
            "417",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n".to_vec(),
            417,
        ),
        ("431", big_header.into_bytes(), 431),
        (
            "501",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            501,
        ),
        (
            "505",
            b"GET /v1/healthcheck HTTP/2.0\r\nHost: x\r\n\r\n".to_vec(),
            505,
        ),
    ];
    for (name, raw, status) in rows {
        assert_headers(name, &exchange(&server, &raw), status);
    }
    // HEAD: the same headers as GET, no body.
    let mut stream = server.connect();
    stream
        .write_all(b"HEAD /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = read_response_from(&mut stream, true).unwrap();
    assert_headers("200 HEAD", &head, 200);
}

#[test]
fn a_408_carries_the_security_headers() {
    let server = spawn_server(&["--read-timeout", "300ms"]);
    let mut stream = server.connect();
    stream.write_all(b"GET /v1/health").unwrap();
    assert_headers("408", &read_response(&mut stream), 408);
}

#[test]
fn admin_responses_carry_them_too_503_included() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut server = spawn_server(&["--admin-addr", &admin, "--drain-delay", "30s"]);
    let admin = admin_addr(&mut server);
    assert_headers("admin 200", &get(admin, "/readyz"), 200);
    assert_headers("admin 404", &get(admin, "/nope"), 404);
    server.terminate();
    assert_headers("admin 503", &get(admin, "/readyz"), 503);
}
