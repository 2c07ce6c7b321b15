//! Response encoding: status line and headers, with the JSON body serialized straight into the
//! connection's write buffer (no intermediate `String`).

use serde::Serialize;

/// The statuses greenlight produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200
    Ok,
    /// 400
    BadRequest,
    /// 404
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 408
    RequestTimeout,
    /// 413
    PayloadTooLarge,
    /// 414
    UriTooLong,
    /// 417
    ExpectationFailed,
    /// 431
    HeaderFieldsTooLarge,
    /// 501
    NotImplemented,
    /// 503 (admin probes only)
    ServiceUnavailable,
    /// 505
    VersionNotSupported,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::UriTooLong => 414,
            Status::ExpectationFailed => 417,
            Status::HeaderFieldsTooLarge => 431,
            Status::NotImplemented => 501,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    /// The complete status line, CRLF included.
    fn line(self) -> &'static [u8] {
        match self {
            Status::Ok => b"HTTP/1.1 200 OK\r\n",
            Status::BadRequest => b"HTTP/1.1 400 Bad Request\r\n",
            Status::NotFound => b"HTTP/1.1 404 Not Found\r\n",
            Status::MethodNotAllowed => b"HTTP/1.1 405 Method Not Allowed\r\n",
            Status::RequestTimeout => b"HTTP/1.1 408 Request Timeout\r\n",
            Status::PayloadTooLarge => b"HTTP/1.1 413 Content Too Large\r\n",
            Status::UriTooLong => b"HTTP/1.1 414 URI Too Long\r\n",
            Status::ExpectationFailed => b"HTTP/1.1 417 Expectation Failed\r\n",
            Status::HeaderFieldsTooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            Status::NotImplemented => b"HTTP/1.1 501 Not Implemented\r\n",
            Status::ServiceUnavailable => b"HTTP/1.1 503 Service Unavailable\r\n",
            Status::VersionNotSupported => b"HTTP/1.1 505 HTTP Version Not Supported\r\n",
        }
    }
}

/// Headers every response carries, success and error alike: static bytes written with the rest
/// of the head. OWASP's REST Security Cheat Sheet lists them for API responses (the reasons for
/// each, and for those not taken, are in docs/operations.md):
/// - `Cache-Control: no-store`: no cache, private or shared, may keep a response, so a proxy
///   never answers "available" for an instance that is gone (REDbot warns without it);
/// - `X-Content-Type-Options: nosniff`: a browser never second-guesses `application/json`;
/// - `Content-Security-Policy: frame-ancestors 'none'` and `X-Frame-Options: DENY` (for
///   browsers without CSP): no response can be framed (drag-and-drop clickjacking).
pub const SECURITY_HEADERS: &[u8] = b"Cache-Control: no-store\r\n\
X-Content-Type-Options: nosniff\r\n\
Content-Security-Policy: frame-ancestors 'none'\r\n\
X-Frame-Options: DENY\r\n";

/// The interim response sent before reading a body the client is holding back (RFC 9110 §10.1.1).
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How the connection goes on after this response; decided when the head is encoded, so that a
/// drain that began after the request arrived still puts `Connection: close` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1 default: nothing to say.
    KeepAlive,
    /// HTTP/1.0 client that asked for keep-alive: say we agree.
    KeepAliveAnnounced,
    /// `Connection: close`: this is the last response on the connection.
    Close,
}

/// Everything about a response except its body.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    /// The status.
    pub status: Status,
    /// What happens to the connection afterwards.
    pub persistence: Persistence,
    /// The `Allow` header value, for 405.
    pub allow: Option<&'static str>,
    /// A response to HEAD: headers as for GET, no body (RFC 9110 §9.3.2).
    pub head_only: bool,
}

/// The content type of every JSON response.
pub const JSON: &str = "application/json";

/// Appends a complete JSON response to `out`: the body is serialized in place first (its
/// length is only known then), the head is appended behind it, and the two are swapped by a
/// rotation.
pub fn encode<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    head: &ResponseHead,
    date: &[u8],
    body: &T,
) {
    let start = out.len();
    if serde_json::to_writer_pretty(&mut *out, body).is_err() {
        // Serializing our own plain structs into a Vec cannot fail; keep the framing honest anyway.
        out.truncate(start);
        out.extend_from_slice(b"{}");
    }
    out.push(b'\n');
    finish(out, start, head, date, JSON);
}

/// Appends a complete response whose body is `body`, of type `content_type`.
pub fn encode_raw(
    out: &mut Vec<u8>,
    head: &ResponseHead,
    date: &[u8],
    content_type: &str,
    body: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(body);
    finish(out, start, head, date, content_type);
}

/// Puts the head in front of the body that `out[start..]` holds (dropping it for HEAD).
fn finish(out: &mut Vec<u8>, start: usize, head: &ResponseHead, date: &[u8], content_type: &str) {
    let body_len = out.len() - start;
    if head.head_only {
        out.truncate(start);
    }
    let body_end = out.len();

    out.extend_from_slice(head.status.line());
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(SECURITY_HEADERS);
    if let Some(allow) = head.allow {
        out.extend_from_slice(b"Allow: ");
        out.extend_from_slice(allow.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match head.persistence {
        Persistence::KeepAlive => {}
        Persistence::KeepAliveAnnounced => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        Persistence::Close => out.extend_from_slice(b"Connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");

    let head_len = out.len() - body_end;
    if let Some(response) = out.get_mut(start..) {
        response.rotate_right(head_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Body {
        error: &'static str,
    }

    fn head(persistence: Persistence, head_only: bool) -> ResponseHead {
        ResponseHead {
            status: Status::MethodNotAllowed,
            persistence,
            allow: Some("GET, HEAD"),
            head_only,
        }
    }

    const DATE: &[u8] = b"Sun, 06 Nov 1994 08:49:37 GMT";

    #[test]
    fn encodes_head_then_pretty_json_body() {
        let mut out = b"previous".to_vec();
        encode(
            &mut out,
            &head(Persistence::Close, false),
            DATE,
            &Body { error: "x" },
        );
        let text = String::from_utf8(out).unwrap();
        let body = "{\n  \"error\": \"x\"\n}\n";
        assert_eq!(
            text,
            format!(
                "previousHTTP/1.1 405 Method Not Allowed\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
                 X-Content-Type-Options: nosniff\r\n\
                 Content-Security-Policy: frame-ancestors 'none'\r\nX-Frame-Options: DENY\r\n\
                 Allow: GET, HEAD\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[test]
    fn head_response_has_get_length_but_no_body() {
        let mut with_body = Vec::new();
        encode(
            &mut with_body,
            &head(Persistence::KeepAlive, false),
            DATE,
            &Body { error: "x" },
        );
        let mut head_only = Vec::new();
        encode(
            &mut head_only,
            &head(Persistence::KeepAlive, true),
            DATE,
            &Body { error: "x" },
        );
        assert!(with_body.starts_with(&head_only));
        assert!(head_only.ends_with(b"\r\n\r\n"));
        assert!(
            String::from_utf8(head_only)
                .unwrap()
                .contains("Content-Length: 19\r\n")
        );
    }

    #[test]
    fn http10_keep_alive_is_announced() {
        let mut out = Vec::new();
        encode(
            &mut out,
            &head(Persistence::KeepAliveAnnounced, false),
            DATE,
            &Body { error: "x" },
        );
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("\r\nConnection: keep-alive\r\n")
        );
    }
}
