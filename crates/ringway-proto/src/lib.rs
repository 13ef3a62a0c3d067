//! HTTP/1.1 codec for Ringway.
//!
//! A proxy that frames a message differently from the server behind it lets an attacker smuggle
//! a second request inside the first. This crate therefore parses strictly (RFC 9112): every head
//! is checked for bare CR/LF and NUL before `httparse` sees it, framing headers are validated
//! as a whole, and every rejection maps to the status the proxy answers with
//! ([`HeadError::status`]).
//!
//! Nothing here does I/O or allocates per message: parsing borrows the caller's buffer and
//! header slots, the chunked decoder is a small state machine, and the head writer appends to a
//! caller-owned `Vec`.
#![forbid(unsafe_code)]

pub mod chunked;
pub mod head;
pub mod token;
pub mod write;

pub use chunked::{ChunkError, ChunkedDecoder, Decoded};
pub use head::{
    BodyFraming, HeadError, HeadLimits, Method, OriginTarget, Request, RequestMeta, Response,
    ResponseFraming, ResponseMeta, Version, parse_request, parse_response, scan_head,
};
pub use write::HeadWriter;

/// Header slots handed to `httparse`: the hard ceiling for `headers_count_max`.
pub const HEADER_SLOTS: usize = 128;
