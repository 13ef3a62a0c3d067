//! Chunked transfer coding (RFC 9112 §7.1): a streaming decoder and the encoder's framing.
//!
//! The proxy decodes what one side sends and encodes afresh for the other, so chunk extensions
//! and trailers never cross it: the upstream only ever sees chunk framing that the proxy itself
//! wrote. The decoder is strict about what it accepts: hex sizes without sign or prefix, CRLF
//! everywhere, bounded chunk lines and trailers.

/// Longest chunk-size line accepted (size, extensions, CRLF).
pub const CHUNK_LINE_BYTES_MAX: usize = 4096;
/// Largest trailer section accepted (all trailer lines together).
pub const TRAILER_BYTES_MAX: usize = 16 * 1024;

/// Why a chunked body was refused.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size overflows")]
    Overflow,
    #[error("invalid chunk extension")]
    Extension,
    #[error("chunk line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk data")]
    DataTerminator,
    #[error("bare CR or LF in chunk framing")]
    BareLineBreak,
    #[error("invalid trailer")]
    Trailer,
    #[error("trailer section too large")]
    TrailerTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of the chunk size.
    Size,
    /// After the size: whitespace, which must lead to ';'.
    SizeWs,
    /// Inside chunk extensions, up to CR.
    Ext,
    /// Saw CR ending the size line; expecting LF.
    SizeLf,
    /// Reading chunk data.
    Data,
    /// Expecting CR after data.
    DataCr,
    /// Expecting LF after data.
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Saw CR in a trailer line; expecting LF.
    TrailerLf,
    /// Saw CR of the final empty line; expecting LF.
    EndLf,
    Done,
}

/// What one call to [`ChunkedDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of input used (framing and data).
    pub consumed: usize,
    /// Chunk data found: a range of the input, `start..start + len`.
    pub data: Option<(usize, usize)>,
    /// The last chunk and trailers have been read: the body is complete.
    pub done: bool,
}

/// A streaming chunked decoder. Feed it bytes as they arrive; it hands back ranges of chunk data
/// and never buffers anything itself.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Data bytes left in the current chunk (while in `Size`: the size being read).
    remaining: u64,
    size_digits: u8,
    line_bytes: usize,
    trailer_bytes: usize,
    trailer_name_done: bool,
    trailer_name_len: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: State::Size,
            remaining: 0,
            size_digits: 0,
            line_bytes: 0,
            trailer_bytes: 0,
            trailer_name_done: false,
            trailer_name_len: 0,
        }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, stopping after the first piece of chunk data so the caller can
    /// forward it. Call again with the rest of the input until `consumed` is 0 with no data, or
    /// `done` is set.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let avail = (input.len() - i) as u64;
                let take = avail.min(self.remaining) as usize;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Decoded {
                    consumed: i + take,
                    data: Some((i, take)),
                    done: false,
                });
            }
            let b = input[i];
            i += 1;
            self.step(b)?;
            if self.state == State::Done {
                return Ok(Decoded {
                    consumed: i,
                    data: None,
                    done: true,
                });
            }
        }
        Ok(Decoded {
            consumed: i,
            data: None,
            done: false,
        })
    }

    fn count_line(&mut self) -> Result<(), ChunkError> {
        self.line_bytes += 1;
        if self.line_bytes > CHUNK_LINE_BYTES_MAX {
            return Err(ChunkError::LineTooLong);
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > TRAILER_BYTES_MAX {
            return Err(ChunkError::TrailerTooLarge);
        }
        Ok(())
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::Size => {
                self.count_line()?;
                match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.size_digits == 16 {
                            return Err(ChunkError::Overflow);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.remaining = (self.remaining << 4) | u64::from(d);
                        self.size_digits += 1;
                    }
                    _ if self.size_digits == 0 => return Err(ChunkError::Size),
                    b'\r' => self.state = State::SizeLf,
                    b';' => self.state = State::Ext,
                    b' ' | b'\t' => self.state = State::SizeWs,
                    b'\n' => return Err(ChunkError::BareLineBreak),
                    _ => return Err(ChunkError::Size),
                }
                if self.remaining > i64::MAX as u64 {
                    return Err(ChunkError::Overflow);
                }
            }
            State::SizeWs => {
                self.count_line()?;
                match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = State::Ext,
                    _ => return Err(ChunkError::Extension),
                }
            }
            State::Ext => {
                self.count_line()?;
                match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::BareLineBreak),
                    // Visible ASCII, whitespace and obs-text may appear in tokens and quoted
                    // strings; control bytes never do.
                    b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                    _ => return Err(ChunkError::Extension),
                }
            }
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::BareLineBreak);
                }
                self.line_bytes = 0;
                self.size_digits = 0;
                if self.remaining == 0 {
                    self.state = State::TrailerStart;
                } else {
                    self.state = State::Data;
                }
            }
            State::Data => unreachable_data(),
            State::DataCr => {
                if b != b'\r' {
                    return Err(ChunkError::DataTerminator);
                }
                self.state = State::DataLf;
            }
            State::DataLf => {
                if b != b'\n' {
                    return Err(ChunkError::DataTerminator);
                }
                self.state = State::Size;
                self.remaining = 0;
            }
            State::TrailerStart => {
                self.count_trailer()?;
                match b {
                    b'\r' => self.state = State::EndLf,
                    _ if crate::token::is_tchar(b) => {
                        self.state = State::TrailerLine;
                        self.trailer_name_done = false;
                        self.trailer_name_len = 1;
                    }
                    _ => return Err(ChunkError::Trailer),
                }
            }
            State::TrailerLine => {
                self.count_trailer()?;
                if !self.trailer_name_done {
                    match b {
                        b':' => self.trailer_name_done = true,
                        _ if crate::token::is_tchar(b) => self.trailer_name_len += 1,
                        _ => return Err(ChunkError::Trailer),
                    }
                } else {
                    match b {
                        b'\r' => self.state = State::TrailerLf,
                        b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                        _ => return Err(ChunkError::Trailer),
                    }
                }
            }
            State::TrailerLf => {
                self.count_trailer()?;
                if b != b'\n' {
                    return Err(ChunkError::BareLineBreak);
                }
                self.state = State::TrailerStart;
            }
            State::EndLf => {
                if b != b'\n' {
                    return Err(ChunkError::BareLineBreak);
                }
                self.state = State::Done;
            }
            State::Done => {}
        }
        Ok(())
    }
}

// `decode` consumes data in bulk and never hands a data byte to `step`.
#[inline]
fn unreachable_data() {
    debug_assert!(false, "chunk data must be consumed in bulk");
}

/// The framing that ends a chunked body: the last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The CRLF that follows each chunk's data.
pub const CHUNK_DATA_END: &[u8] = b"\r\n";

/// Appends the size line of a chunk of `len` bytes (`len` must not be 0).
pub fn write_chunk_size(len: usize, out: &mut Vec<u8>) {
    debug_assert!(len > 0, "a zero-size chunk ends the body");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns the body and whether it completed.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool, usize), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut pending: Vec<u8> = Vec::new();
        while fed < input.len() || !pending.is_empty() {
            let end = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..end]);
            fed = end;
            loop {
                let r = d.decode(&pending)?;
                if let Some((s, l)) = r.data {
                    out.extend_from_slice(&pending[s..s + l]);
                }
                pending.drain(..r.consumed);
                if r.done {
                    return Ok((out, true, input.len() - fed + pending.len()));
                }
                if r.consumed == 0 || pending.is_empty() {
                    break;
                }
            }
            if fed == input.len() {
                break;
            }
        }
        Ok((out, false, 0))
    }

    #[test]
    fn decodes_in_any_split() {
        let input =
            b"5\r\nhello\r\n1;ext=\"a b\"\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: v\r\n\r\nNEXT";
        for step in 1..input.len() {
            let (body, done, rest) = decode_all(input, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert!(done);
            assert_eq!(rest, 4, "step {step}");
        }
    }

    #[test]
    fn empty_body() {
        let (body, done, _) = decode_all(b"0\r\n\r\n", 100).unwrap();
        assert!(body.is_empty() && done);
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            &b"\r\n"[..],
            b"-5\r\n",
            b"+5\r\n",
            b"0x5\r\n",
            b"g\r\n",
            b" 5\r\n",
            b"5 \r\n",
            b"5\n",
            b"5\r5",
            b"11111111111111111\r\n",
            b"ffffffffffffffff\r\n",
        ] {
            let r = decode_all(bad, 64);
            assert!(r.is_err(), "{:?} -> {r:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rejects_bad_data_terminator_and_ext() {
        assert_eq!(
            decode_all(b"3\r\nabcX\r\n", 64),
            Err(ChunkError::DataTerminator)
        );
        assert_eq!(
            decode_all(b"3\r\nabc\rX", 64),
            Err(ChunkError::DataTerminator)
        );
        assert_eq!(
            decode_all(b"3;a\x01\r\nabc\r\n", 64),
            Err(ChunkError::Extension)
        );
        assert_eq!(
            decode_all(b"3;a\nabc\r\n", 64),
            Err(ChunkError::BareLineBreak)
        );
        let mut long = b"3;".to_vec();
        long.resize(CHUNK_LINE_BYTES_MAX + 10, b'a');
        assert_eq!(decode_all(&long, 64), Err(ChunkError::LineTooLong));
    }

    #[test]
    fn rejects_bad_trailers() {
        assert_eq!(
            decode_all(b"0\r\nX T: v\r\n\r\n", 64),
            Err(ChunkError::Trailer)
        );
        assert_eq!(decode_all(b"0\r\nX: v\n\r\n", 64), Err(ChunkError::Trailer));
        assert_eq!(decode_all(b"0\r\n\rX", 64), Err(ChunkError::BareLineBreak));
        let mut big = b"0\r\n".to_vec();
        while big.len() < TRAILER_BYTES_MAX + 100 {
            big.extend_from_slice(b"X-A: 0123456789\r\n");
        }
        assert_eq!(decode_all(&big, 1024), Err(ChunkError::TrailerTooLarge));
    }

    #[test]
    fn incomplete_body_is_not_done() {
        let (body, done, _) = decode_all(b"5\r\nhel", 64).unwrap();
        assert_eq!(body, b"hel");
        assert!(!done);
    }

    #[test]
    fn writes_sizes() {
        for (n, s) in [
            (1usize, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65536, "10000\r\n"),
        ] {
            let mut out = Vec::new();
            write_chunk_size(n, &mut out);
            assert_eq!(out, s.as_bytes());
        }
    }

    #[test]
    fn roundtrip_encode_decode() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut enc = Vec::new();
        for piece in payload.chunks(7777) {
            write_chunk_size(piece.len(), &mut enc);
            enc.extend_from_slice(piece);
            enc.extend_from_slice(CHUNK_DATA_END);
        }
        enc.extend_from_slice(LAST_CHUNK);
        let (body, done, rest) = decode_all(&enc, 4096).unwrap();
        assert!(done);
        assert_eq!(rest, 0);
        assert_eq!(body, payload);
    }
}
