//! What can go wrong with a request, and the ONE mapping from an error to the response it gets.

use super::response::Status;

/// Why a request cannot be served. Every variant is answered with a JSON error and the
/// connection is closed after it (the framing of whatever follows can no longer be trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// The request line or a header line is not valid HTTP/1.1 syntax (RFC 9112 §3, §5).
    Malformed(&'static str),
    /// The request line (method and target) is longer than the limit.
    UriTooLong,
    /// The header section is larger than the limit, or has too many fields.
    HeadersTooLarge,
    /// The body is larger than the limit (decided from `Content-Length` when there is one).
    BodyTooLarge,
    /// `Content-Length` is not a plain decimal number, or several disagree (RFC 9112 §6.3).
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding` were sent: a smuggling vector (RFC 9112 §6.1).
    LengthAndEncoding,
    /// `Transfer-Encoding` whose final coding is not a single `chunked` (RFC 9112 §6.3).
    BadTransferEncoding,
    /// A transfer coding we recognise but do not decode (gzip, deflate, compress before chunked).
    UnsupportedTransferEncoding,
    /// The chunked body framing is broken (RFC 9112 §7.1).
    BadChunk,
    /// A chunk extension or the trailer section is longer than the limit.
    ChunkMetadataTooLarge,
    /// HTTP/1.1 request without exactly one `Host` header (RFC 9112 §3.2).
    BadHost,
    /// An `Expect` value other than `100-continue` (RFC 9110 §10.1.1).
    ExpectationFailed,
    /// A protocol version other than HTTP/1.0 and HTTP/1.1.
    UnsupportedVersion,
    /// The request (head and body) did not arrive within the read timeout.
    Timeout,
}

impl HttpError {
    /// The status and the human-readable message for the JSON `error` field.
    pub fn response(self) -> (Status, &'static str) {
        match self {
            HttpError::Malformed(why) => (Status::BadRequest, why),
            HttpError::UriTooLong => (Status::UriTooLong, "the request line is too long"),
            HttpError::HeadersTooLarge => (
                Status::HeaderFieldsTooLarge,
                "the request header section is too large",
            ),
            HttpError::BodyTooLarge => (Status::PayloadTooLarge, "the request body is too large"),
            HttpError::BadContentLength => (Status::BadRequest, "invalid Content-Length header"),
            HttpError::LengthAndEncoding => (
                Status::BadRequest,
                "Content-Length and Transfer-Encoding must not both be sent",
            ),
            HttpError::BadTransferEncoding => {
                (Status::BadRequest, "invalid Transfer-Encoding header")
            }
            HttpError::UnsupportedTransferEncoding => (
                Status::NotImplemented,
                "only the chunked transfer coding is supported",
            ),
            HttpError::BadChunk => (Status::BadRequest, "invalid chunked body"),
            HttpError::ChunkMetadataTooLarge => (
                Status::BadRequest,
                "chunk extension or trailer section too large",
            ),
            HttpError::BadHost => (
                Status::BadRequest,
                "an HTTP/1.1 request needs exactly one Host header",
            ),
            HttpError::ExpectationFailed => (
                Status::ExpectationFailed,
                "only the 100-continue expectation is supported",
            ),
            HttpError::UnsupportedVersion => (
                Status::VersionNotSupported,
                "only HTTP/1.0 and HTTP/1.1 are supported",
            ),
            HttpError::Timeout => (
                Status::RequestTimeout,
                "the request did not arrive within the read timeout",
            ),
        }
    }
}
