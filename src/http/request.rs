//! Request heads: `httparse` does the syntax, this file the semantics that frame the message
//! (RFC 9112 §6: Content-Length, Transfer-Encoding), persistence, `Expect` and `Host`.

use super::error::HttpError;
use super::limits::Limits;
use super::response::Persistence;

/// Header fields parsed per request; a request with more is answered 431. Lives on the stack.
pub const MAX_HEADERS: usize = 64;

/// The protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: close after the response unless keep-alive is asked for.
    Http10,
    /// HTTP/1.1: persistent unless `Connection: close`.
    Http11,
}

/// How the body of a request is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// A chunked body follows the head.
    Chunked,
}

/// A parsed request head. Borrowed from the input, so everything needed later is copied out of
/// it before the input moves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'b> {
    /// Bytes of the head, including the empty line that ends it.
    pub len: usize,
    /// The method token, case-sensitive (RFC 9110 §9.1).
    pub method: &'b str,
    /// The request target as sent.
    pub target: &'b str,
    /// The protocol version.
    pub version: Version,
    /// How the body is delimited.
    pub framing: Framing,
    /// What the client asked for the connection after this response.
    pub persistence: Persistence,
    /// `Expect: 100-continue` was sent.
    pub expects_continue: bool,
}

/// Parses a request head from the start of `buf`. `Ok(None)` means more bytes are needed, which
/// is not an error (habit 4); limits are checked on partial input too, so a client cannot make
/// us buffer an unbounded head.
pub fn parse_head<'b>(buf: &'b [u8], limits: &Limits) -> Result<Option<Head<'b>>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            check_partial_size(buf, limits)?;
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadersTooLarge),
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(error) => return Err(syntax_error(error)),
    };
    if request_line_len(buf).is_none_or(|line| line > limits.max_request_line) {
        return Err(HttpError::UriTooLong);
    }
    if len > limits.max_head {
        return Err(HttpError::HeadersTooLarge);
    }
    if buf.get(..len).is_some_and(has_bare_lf) {
        return Err(HttpError::Malformed(
            "bare LF line ending; lines end in CRLF",
        ));
    }

    let version = match request.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    let fields = Fields::collect(request.headers)?;
    let framing = fields.framing(version, limits)?;
    if version == Version::Http11 && fields.hosts != 1 || fields.hosts > 1 {
        return Err(HttpError::BadHost);
    }
    let persistence = match (version, fields.close, fields.keep_alive) {
        (_, true, _) => Persistence::Close,
        (Version::Http11, false, _) => Persistence::KeepAlive,
        (Version::Http10, false, true) => Persistence::KeepAliveAnnounced,
        (Version::Http10, false, false) => Persistence::Close,
    };
    Ok(Some(Head {
        len,
        method: request.method.unwrap_or_default(),
        target: request.path.unwrap_or_default(),
        version,
        framing,
        persistence,
        expects_continue: fields.expects_continue && version == Version::Http11,
    }))
}

/// Rejects a partial head that has already outgrown the limits.
fn check_partial_size(buf: &[u8], limits: &Limits) -> Result<(), HttpError> {
    match request_line_len(buf) {
        None if buf.len() > limits.max_request_line => Err(HttpError::UriTooLong),
        Some(line) if line > limits.max_request_line => Err(HttpError::UriTooLong),
        _ if buf.len() > limits.max_head => Err(HttpError::HeadersTooLarge),
        _ => Ok(()),
    }
}

/// Length of the first non-empty line (httparse skips leading empty lines, RFC 9112 §2.2).
fn request_line_len(buf: &[u8]) -> Option<usize> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let rest = buf.get(start..)?;
    rest.iter().position(|&b| b == b'\n')
}

/// A line ending in LF without CR. RFC 9112 §2.2 lets a recipient accept it, but peers that
/// disagree on it are how a request gets hidden inside another one (request smuggling), so
/// greenlight rejects it, as it does in chunked framing.
fn has_bare_lf(head: &[u8]) -> bool {
    let mut previous = 0u8;
    head.iter().any(|&b| {
        let bare = b == b'\n' && previous != b'\r';
        previous = b;
        bare
    })
}

/// httparse reports any bad version token the same way: 505 for a well-formed `HTTP/x.y`
/// that we do not speak, 400 for garbage.
fn version_error(buf: &[u8]) -> HttpError {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line = buf.get(start..).unwrap_or_default();
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let token = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    match token {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            HttpError::UnsupportedVersion
        }
        _ => HttpError::Malformed("malformed request line"),
    }
}

fn syntax_error(error: httparse::Error) -> HttpError {
    match error {
        httparse::Error::HeaderName => HttpError::Malformed("malformed header name"),
        httparse::Error::HeaderValue => HttpError::Malformed("malformed header value"),
        httparse::Error::NewLine => HttpError::Malformed("malformed line ending"),
        httparse::Error::Token => HttpError::Malformed("malformed method"),
        _ => HttpError::Malformed("malformed request line"),
    }
}

/// The header fields that matter to framing and persistence, gathered in one pass.
#[derive(Default)]
struct Fields {
    hosts: usize,
    content_length: Option<u64>,
    /// Transfer codings in order, across every `Transfer-Encoding` line.
    codings: usize,
    chunked_at: Option<usize>,
    chunked_count: usize,
    other_coding: Option<Coding>,
    close: bool,
    keep_alive: bool,
    expects_continue: bool,
}

/// A transfer coding other than chunked.
#[derive(Clone, Copy)]
enum Coding {
    /// gzip, deflate, compress: registered codings we do not decode (501).
    Known,
    /// Anything else (400: a smuggler's `xchunked`, or `identity`, which RFC 9112 removed).
    Unknown,
}

impl Fields {
    fn collect(headers: &[httparse::Header<'_>]) -> Result<Fields, HttpError> {
        let mut fields = Fields::default();
        for header in headers {
            let name = header.name;
            let value = header.value;
            if name.eq_ignore_ascii_case("host") {
                fields.hosts += 1;
            } else if name.eq_ignore_ascii_case("content-length") {
                fields.add_content_length(value)?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                fields.add_codings(value);
            } else if name.eq_ignore_ascii_case("connection") {
                for token in list(value) {
                    fields.close |= token.eq_ignore_ascii_case(b"close");
                    fields.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("expect") {
                if trim(value).eq_ignore_ascii_case(b"100-continue") {
                    fields.expects_continue = true;
                } else {
                    return Err(HttpError::ExpectationFailed);
                }
            }
        }
        Ok(fields)
    }

    /// `Content-Length = 1*DIGIT`; a list of identical values is one value (RFC 9112 §6.3 item 5).
    fn add_content_length(&mut self, value: &[u8]) -> Result<(), HttpError> {
        let mut any = false;
        for item in value.split(|&b| b == b',') {
            let length = parse_decimal(trim(item)).ok_or(HttpError::BadContentLength)?;
            if self.content_length.is_some_and(|seen| seen != length) {
                return Err(HttpError::BadContentLength);
            }
            self.content_length = Some(length);
            any = true;
        }
        if any {
            Ok(())
        } else {
            Err(HttpError::BadContentLength)
        }
    }

    fn add_codings(&mut self, value: &[u8]) {
        for coding in list(value) {
            if coding.eq_ignore_ascii_case(b"chunked") {
                self.chunked_at = Some(self.codings);
                self.chunked_count += 1;
            } else {
                let known = [
                    &b"gzip"[..],
                    b"x-gzip",
                    b"deflate",
                    b"compress",
                    b"x-compress",
                ]
                .iter()
                .any(|k| coding.eq_ignore_ascii_case(k));
                let kind = if known {
                    Coding::Known
                } else {
                    Coding::Unknown
                };
                if !matches!(self.other_coding, Some(Coding::Unknown)) {
                    self.other_coding = Some(kind);
                }
            }
            self.codings += 1;
        }
    }

    /// RFC 9112 §6.3: Transfer-Encoding with Content-Length is rejected outright (a smuggling
    /// vector); chunked must be the final coding and appear once; HTTP/1.0 has no chunked.
    fn framing(&self, version: Version, limits: &Limits) -> Result<Framing, HttpError> {
        if self.codings == 0 {
            return match self.content_length {
                None | Some(0) => Ok(Framing::Empty),
                Some(length) if length > limits.max_body => Err(HttpError::BodyTooLarge),
                Some(length) => Ok(Framing::Length(length)),
            };
        }
        if self.content_length.is_some() {
            return Err(HttpError::LengthAndEncoding);
        }
        let chunked_last = self.chunked_at == Some(self.codings - 1) && self.chunked_count == 1;
        match (version, chunked_last, self.other_coding) {
            (Version::Http11, true, None) => Ok(Framing::Chunked),
            (Version::Http11, true, Some(Coding::Known)) => {
                Err(HttpError::UnsupportedTransferEncoding)
            }
            _ => Err(HttpError::BadTransferEncoding),
        }
    }
}

/// Elements of a comma-separated list, trimmed, empty ones skipped (RFC 9110 §5.6.1).
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|item| !item.is_empty())
}

/// Strips optional white space (SP / HTAB) from both ends.
fn trim(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    value.get(start..end).unwrap_or_default()
}

/// `1*DIGIT` into a u64: no sign, no spaces, no overflow (`str::parse` would accept `+5`).
pub fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head<'_>>, HttpError> {
        parse_head(raw.as_bytes(), &Limits::default())
    }

    fn complete(raw: &str) -> Head<'_> {
        parse(raw).unwrap().unwrap()
    }

    #[test]
    fn parses_a_simple_get() {
        let raw = "GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n";
        let head = complete(raw);
        assert_eq!(head.len, raw.len());
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/v1/healthcheck");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(head.persistence, Persistence::KeepAlive);
        assert!(!head.expects_continue);
    }

    const BARE_LF: HttpError = HttpError::Malformed("bare LF line ending; lines end in CRLF");

    #[test]
    fn every_proper_prefix_is_partial() {
        let raw = "POST /v1/healthcheck HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n";
        for end in 0..raw.len() {
            assert_eq!(parse(&raw[..end]), Ok(None), "prefix of {end} bytes");
        }
        assert_eq!(complete(raw).framing, Framing::Length(3));
    }

    #[test]
    fn persistence_follows_version_and_connection_tokens() {
        let rows: &[(&str, Persistence)] = &[
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", Persistence::KeepAlive),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                Persistence::Close,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive, CLOSE\r\n\r\n",
                Persistence::Close,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n",
                Persistence::KeepAlive,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: not-close\r\n\r\n",
                Persistence::KeepAlive,
            ),
            ("GET / HTTP/1.0\r\n\r\n", Persistence::Close),
            (
                "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                Persistence::KeepAliveAnnounced,
            ),
        ];
        for (raw, expected) in rows {
            assert_eq!(complete(raw).persistence, *expected, "{raw:?}");
        }
    }

    #[test]
    fn framing_table() {
        use Framing::*;
        let ok: &[(&str, Framing)] = &[
            ("Content-Length: 0\r\n", Empty),
            ("Content-Length: 12\r\n", Length(12)),
            ("Content-Length: 12, 12\r\n", Length(12)),
            ("Content-Length: 12\r\nContent-Length: 12\r\n", Length(12)),
            ("Transfer-Encoding: chunked\r\n", Chunked),
            ("Transfer-Encoding: CHUNKED\r\n", Chunked),
        ];
        for (fields, framing) in ok {
            let raw = format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
            assert_eq!(complete(&raw).framing, *framing, "{fields:?}");
        }
        let bad: &[(&str, HttpError)] = &[
            ("Content-Length: +5\r\n", HttpError::BadContentLength),
            ("Content-Length: -1\r\n", HttpError::BadContentLength),
            ("Content-Length: 1 2\r\n", HttpError::BadContentLength),
            ("Content-Length: \r\n", HttpError::BadContentLength),
            ("Content-Length: 0x10\r\n", HttpError::BadContentLength),
            (
                "Content-Length: 99999999999999999999999\r\n",
                HttpError::BadContentLength,
            ),
            ("Content-Length: 1, 2\r\n", HttpError::BadContentLength),
            (
                "Content-Length: 1\r\nContent-Length: 2\r\n",
                HttpError::BadContentLength,
            ),
            ("Content-Length: 99999999999\r\n", HttpError::BodyTooLarge),
            (
                "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                HttpError::LengthAndEncoding,
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                HttpError::LengthAndEncoding,
            ),
            (
                "Transfer-Encoding: xchunked\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "Transfer-Encoding: chunked, identity\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "Transfer-Encoding: identity\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "Transfer-Encoding: gzip, chunked\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            ("Expect: 200-ok\r\n", HttpError::ExpectationFailed),
        ];
        for (fields, error) in bad {
            let raw = format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
            assert_eq!(parse(&raw), Err(*error), "{fields:?}");
        }
    }

    #[test]
    fn http10_has_no_chunked_framing() {
        let raw = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(raw), Err(HttpError::BadTransferEncoding));
    }

    #[test]
    fn syntax_and_version_errors() {
        let rows: &[(&str, HttpError)] = &[
            ("GET / HTTP/2.0\r\n\r\n", HttpError::UnsupportedVersion),
            ("GET / HTTP/1.2\r\n\r\n", HttpError::UnsupportedVersion),
            (
                "GET / FOO/1.1\r\n\r\n",
                HttpError::Malformed("malformed request line"),
            ),
            (
                "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
                HttpError::Malformed("malformed header name"),
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
                HttpError::Malformed("malformed header name"),
            ),
            ("GET / HTTP/1.1\r\n\r\n", HttpError::BadHost),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                HttpError::BadHost,
            ),
            (
                "G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
                HttpError::Malformed("malformed method"),
            ),
            ("GET / HTTP/1.1\nHost: x\n\n", BARE_LF),
            ("GET / HTTP/1.1\r\nHost: x\n\r\n", BARE_LF),
            ("\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", BARE_LF),
        ];
        for (raw, error) in rows {
            assert_eq!(parse(raw), Err(*error), "{raw:?}");
        }
    }

    #[test]
    fn limits_apply_to_partial_and_complete_heads() {
        let limits = Limits::default();
        let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(limits.max_request_line));
        assert_eq!(
            parse(&long_target[..limits.max_request_line + 1]),
            Err(HttpError::UriTooLong)
        );
        assert_eq!(
            parse(&format!("{long_target}Host: x\r\n\r\n")),
            Err(HttpError::UriTooLong)
        );

        let big_field = format!("X: {}\r\n", "b".repeat(limits.max_head));
        let partial = format!("GET / HTTP/1.1\r\n{big_field}");
        assert_eq!(parse(&partial), Err(HttpError::HeadersTooLarge));

        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(parse(&raw), Err(HttpError::HeadersTooLarge));
    }

    #[test]
    fn decimal_parsing_is_strict() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b"+1"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"1 "), None);
    }
}
