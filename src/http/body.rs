//! Request bodies: consumed and discarded as they arrive (no route reads one), so the next
//! pipelined request still parses. Chunked decoding follows RFC 9112 §7.1 strictly (CRLF only,
//! hex sizes with overflow checks, bounded extensions and trailers): a lenient chunk parser is
//! where request smuggling lives.

use super::error::HttpError;
use super::limits::Limits;
use super::request::Framing;

/// Most hex digits a chunk size may have: 16 fill a u64.
const MAX_CHUNK_SIZE_DIGITS: u32 = 16;

/// Where a body decoder stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyDecoder {
    /// `Content-Length` framing: this many bytes still to come.
    Length(u64),
    /// Chunked framing.
    Chunked(Chunked),
}

/// The chunked decoder's position in the grammar, and how much it has decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    decoded: u64,
    /// Bytes of the current chunk extension or of the trailer section so far.
    metadata: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex chunk size.
    Size { value: u64, digits: u32 },
    /// Skipping a chunk extension up to CR.
    Extension { size: u64 },
    /// Expecting the LF that ends the size line.
    SizeLf { size: u64 },
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Expecting the LF that ends a trailer field line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

impl BodyDecoder {
    /// The decoder for a request's framing, or `None` when it has no body.
    pub fn new(framing: Framing) -> Option<BodyDecoder> {
        match framing {
            Framing::Empty => None,
            Framing::Length(length) => Some(BodyDecoder::Length(length)),
            Framing::Chunked => Some(BodyDecoder::Chunked(Chunked {
                state: ChunkState::Size {
                    value: 0,
                    digits: 0,
                },
                decoded: 0,
                metadata: 0,
            })),
        }
    }

    /// Consumes body bytes from the front of `input`. Returns how many bytes were consumed and
    /// whether the body is now complete; bytes after the body are left for the next request.
    pub fn decode(&mut self, input: &[u8], limits: &Limits) -> Result<(usize, bool), HttpError> {
        match self {
            BodyDecoder::Length(remaining) => {
                let take = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                *remaining -= take as u64;
                Ok((take, *remaining == 0))
            }
            BodyDecoder::Chunked(chunked) => chunked.decode(input, limits),
        }
    }
}

impl Chunked {
    fn decode(&mut self, input: &[u8], limits: &Limits) -> Result<(usize, bool), HttpError> {
        let mut pos = 0;
        while pos < input.len() {
            if let ChunkState::Data(left) = self.state {
                let avail = input.len() - pos;
                let take = usize::try_from(left).map_or(avail, |l| l.min(avail));
                pos += take;
                let left = left - take as u64;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                continue;
            }
            let Some(&byte) = input.get(pos) else { break };
            pos += 1;
            self.state = self.step(byte, limits)?;
            if self.state == ChunkState::Done {
                return Ok((pos, true));
            }
        }
        Ok((pos, self.state == ChunkState::Done))
    }

    /// One byte of the framing (everything but chunk data).
    fn step(&mut self, byte: u8, limits: &Limits) -> Result<ChunkState, HttpError> {
        use ChunkState::*;
        Ok(match (self.state, byte) {
            (Size { value, digits }, _) if byte.is_ascii_hexdigit() => {
                if digits >= MAX_CHUNK_SIZE_DIGITS {
                    return Err(HttpError::BadChunk);
                }
                let digit = u64::from((byte as char).to_digit(16).unwrap_or(0));
                Size {
                    value: value << 4 | digit,
                    digits: digits + 1,
                }
            }
            (Size { value, digits }, b';' | b' ' | b'\t') if digits > 0 => {
                self.metadata = 1;
                Extension { size: value }
            }
            (Size { value, digits }, b'\r') if digits > 0 => SizeLf { size: value },
            (Extension { size }, b'\r') => SizeLf { size },
            (Extension { size }, _) if byte == b'\t' || byte >= b' ' && byte != 0x7f => {
                self.metadata += 1;
                if self.metadata > limits.max_chunk_ext {
                    return Err(HttpError::ChunkMetadataTooLarge);
                }
                Extension { size }
            }
            (SizeLf { size: 0 }, b'\n') => {
                self.metadata = 0;
                TrailerStart
            }
            (SizeLf { size }, b'\n') => {
                self.decoded = self.decoded.saturating_add(size);
                if self.decoded > limits.max_body {
                    return Err(HttpError::BodyTooLarge);
                }
                Data(size)
            }
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size {
                value: 0,
                digits: 0,
            },
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | TrailerLine, _) if byte != b'\n' && byte != b'\r' => {
                self.metadata += 1;
                if self.metadata > limits.max_trailer {
                    return Err(HttpError::ChunkMetadataTooLarge);
                }
                TrailerLine
            }
            (TrailerLine, b'\r') => TrailerLf,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            _ => return Err(HttpError::BadChunk),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` split at `split` and returns (consumed, done) or the error.
    fn feed(body: &[u8], split: usize) -> Result<(usize, bool), HttpError> {
        let limits = Limits::default();
        let mut decoder = BodyDecoder::new(Framing::Chunked).unwrap();
        let (first, done) = decoder.decode(&body[..split], &limits)?;
        if done {
            return Ok((first, true));
        }
        assert_eq!(first, split, "a partial body is consumed whole");
        let (second, done) = decoder.decode(&body[split..], &limits)?;
        Ok((first + second, done))
    }

    #[test]
    fn decodes_chunked_split_at_every_boundary() {
        let body = b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            assert_eq!(
                feed(body, split),
                Ok((body.len() - 4, true)),
                "split at {split}"
            );
        }
    }

    #[test]
    fn rejects_broken_framing() {
        let rows: &[&[u8]] = &[
            b"x\r\n",
            b"\r\n",
            b"-1\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\n\n",
            b"11111111111111111\r\n",
            b"5;\x01\r\n",
        ];
        for body in rows {
            assert_eq!(
                feed(body, 0),
                Err(HttpError::BadChunk),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn bounds_size_extensions_and_trailers() {
        let limits = Limits::default();
        let too_big = format!("{:x}\r\n", limits.max_body + 1);
        assert_eq!(feed(too_big.as_bytes(), 0), Err(HttpError::BodyTooLarge));
        let long_ext = format!("1;{}\r\n", "e".repeat(limits.max_chunk_ext));
        assert_eq!(
            feed(long_ext.as_bytes(), 0),
            Err(HttpError::ChunkMetadataTooLarge)
        );
        let long_trailer = format!("0\r\nT: {}\r\n", "t".repeat(limits.max_trailer));
        assert_eq!(
            feed(long_trailer.as_bytes(), 0),
            Err(HttpError::ChunkMetadataTooLarge)
        );
    }

    #[test]
    fn length_framing_stops_at_the_body_end() {
        let limits = Limits::default();
        let mut decoder = BodyDecoder::new(Framing::Length(5)).unwrap();
        assert_eq!(decoder.decode(b"hel", &limits), Ok((3, false)));
        assert_eq!(decoder.decode(b"loGET", &limits), Ok((2, true)));
        assert!(BodyDecoder::new(Framing::Empty).is_none());
    }
}
