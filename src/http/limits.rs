//! The request limits, each a named constant with its unit and the reason for its size.

/// Longest request line (method, target, version) in bytes, else 414. 8 KiB is what nginx's
/// `large_client_header_buffers` and most proxies allow; healthcheck URLs are a few dozen bytes.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;

/// Largest header section in bytes, request line included, else 431. Go allows 1 MiB, nginx
/// 4 x 8 KiB; 16 KiB fits real browsers' cookies and keeps a re-parse of a partial head cheap.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Largest request body in bytes, else 413. No route reads a body; bodies are decoded and
/// discarded so pipelining still works, and 1 MiB bounds how long a client can keep us busy.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// Longest chunk extension (the part after `;` on a chunk-size line) in bytes. Nobody uses them;
/// the bound stops a client from streaming an endless extension (CVE-2023-39326-style amplification).
pub const MAX_CHUNK_EXT_BYTES: usize = 1024;

/// Largest chunked trailer section in bytes. Trailers are discarded; the bound keeps a client
/// from sending an endless one.
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;

/// Highest value the request-line and header-section flags accept: a maximal head must fit the
/// connection's read buffer with room to spare (checked against it at compile time).
pub const MAX_HEAD_CEILING_BYTES: usize = 48 * 1024;

/// The limits in force for one server; built from the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`MAX_REQUEST_LINE_BYTES`].
    pub max_request_line: usize,
    /// See [`MAX_HEAD_BYTES`].
    pub max_head: usize,
    /// See [`MAX_BODY_BYTES`].
    pub max_body: u64,
    /// See [`MAX_CHUNK_EXT_BYTES`].
    pub max_chunk_ext: usize,
    /// See [`MAX_TRAILER_BYTES`].
    pub max_trailer: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_request_line: MAX_REQUEST_LINE_BYTES,
            max_head: MAX_HEAD_BYTES,
            max_body: MAX_BODY_BYTES,
            max_chunk_ext: MAX_CHUNK_EXT_BYTES,
            max_trailer: MAX_TRAILER_BYTES,
        }
    }
}
