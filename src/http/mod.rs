//! HTTP/1.1 wire format: request heads and framing, body decoding, response encoding, errors,
//! the limits, and the cached `Date` value. Nothing here does I/O or knows about routes.

pub mod body;
pub mod date;
pub mod error;
pub mod limits;
pub mod request;
pub mod response;

pub use body::BodyDecoder;
pub use date::DateCache;
pub use error::HttpError;
pub use limits::Limits;
pub use request::{Framing, Head, Version, parse_head};
pub use response::{CONTINUE, Persistence, ResponseHead, Status, encode, encode_raw};
