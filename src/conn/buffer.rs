//! The loop-owned scratch buffers every connection reads into and encodes into. A connection
//! keeps bytes of its own only while a request or a response is split across wake-ups, so an
//! idle connection holds no buffer at all.

/// Size of the scratch read buffer, and so the most input one connection can have buffered:
/// more than a maximal head, and a 16-deep pipeline of ordinary requests arrives in one read.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

// A head at the largest limit an operator may set still fits, with room for what follows it.
const _: () = assert!(READ_BUFFER_BYTES > crate::http::limits::MAX_HEAD_CEILING_BYTES);

/// A fixed, zero-initialised-once byte buffer filled from the front and consumed from the front.
pub struct InputBuf {
    data: Box<[u8]>,
    len: usize,
}

impl InputBuf {
    /// An empty buffer of [`READ_BUFFER_BYTES`].
    pub fn new() -> InputBuf {
        InputBuf {
            data: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            len: 0,
        }
    }

    /// The buffered bytes.
    pub fn filled(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or_default()
    }

    /// The free space behind the buffered bytes, to read into.
    pub fn spare(&mut self) -> &mut [u8] {
        self.data.get_mut(self.len..).unwrap_or_default()
    }

    /// Marks `n` bytes of the spare space as filled.
    pub fn commit(&mut self, n: usize) {
        self.len = (self.len + n).min(self.data.len());
    }

    /// Drops `n` bytes from the front, moving the rest down.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.data.copy_within(n..self.len, 0);
        self.len -= n;
    }

    /// Empties the buffer and loads `bytes` (as many as fit).
    pub fn load(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.data.len());
        if let (Some(dst), Some(src)) = (self.data.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.len = n;
    }

    /// No bytes are buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer is full: stop reading until something is consumed.
    pub fn is_full(&self) -> bool {
        self.len == self.data.len()
    }
}

impl Default for InputBuf {
    fn default() -> InputBuf {
        InputBuf::new()
    }
}

/// The scratch space of the loop, lent to one connection at a time.
#[derive(Default)]
pub struct Scratch {
    /// Input being parsed.
    pub input: InputBuf,
    /// Responses being encoded (keeps its capacity between uses).
    pub output: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_consumes_and_reloads() {
        let mut buf = InputBuf::new();
        buf.spare()[..5].copy_from_slice(b"hello");
        buf.commit(5);
        assert_eq!(buf.filled(), b"hello");
        buf.consume(2);
        assert_eq!(buf.filled(), b"llo");
        buf.load(b"xy");
        assert_eq!(buf.filled(), b"xy");
        buf.consume(10);
        assert!(buf.is_empty());
        buf.commit(READ_BUFFER_BYTES + 1);
        assert!(buf.is_full());
    }
}
