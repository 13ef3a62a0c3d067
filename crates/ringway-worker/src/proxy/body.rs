//! Phase 3, body: `Expect: 100-continue` is answered once the request is known to be routable
//! and within limits (the upstream never sees the Expect header), then a small body is read
//! whole before an upstream connection is taken (a large one: its first part), so a client
//! that sends slowly holds only its own connection. The body's reads are held to the client's
//! rate floor and total deadline (`crate::pace`) from here on.

use super::{Client, Req};
use crate::client::ClientIo;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::pace::Pace;
use crate::worker::Worker;
use ringway_proto::{BodyFraming, ChunkedDecoder};

/// Most buffer space a body read in this phase adds at a time.
const BUFFER_READ_BYTES_MAX: usize = 16 * 1024;

/// Answers `Expect: 100-continue` (when nothing of the body is here yet) and buffers the body.
pub(super) async fn run<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    body_max: u64,
    pace: &mut Pace,
) -> Result<(), ProxyError> {
    if req.meta.framing == BodyFraming::None {
        return Ok(());
    }
    if req.meta.expect_continue && !c.rb.has_unread() {
        let mut cont = w.bufs.take();
        cont.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        let (r, b) = c.io.write_all(cont, w.settings.client_write).await;
        w.bufs.put(b);
        r.map_err(|e| e.on(Side::Client))?;
    }
    buffer(w, c, req.meta.framing, body_max, pace).await
}

/// Reads the request body into `c.rb` until it is complete or `limits.request_buffer_bytes` of
/// it arrived, whichever is first (nginx buffers request bodies by default for the same
/// reason). The bytes stay unread for the pump. A chunked body over `body_max` is refused here,
/// before any upstream connection.
async fn buffer<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    framing: BodyFraming,
    body_max: u64,
    pace: &mut Pace,
) -> Result<(), ProxyError> {
    let limit = w.settings.request_buffer_bytes;
    // Chunked: how far the decoder has read the unread bytes (so a dripping client costs
    // one decoder pass over its bytes, not one per read), and the body bytes it found.
    let mut dec = ChunkedDecoder::new();
    let mut scanned = 0usize;
    let mut decoded = 0u64;
    loop {
        let unread = c.rb.unread();
        let enough = match framing {
            BodyFraming::None => true,
            BodyFraming::Length(n) => unread.len() as u64 >= n.min(limit as u64),
            BodyFraming::Chunked => loop {
                let d = dec
                    .decode(&unread[scanned..])
                    .map_err(|_| ProxyError::client(ErrorKind::Protocol))?;
                scanned += d.consumed;
                decoded += d.data.map_or(0, |(_, len)| len as u64);
                if decoded > body_max {
                    return Err(ProxyError::client(ErrorKind::BodyTooLarge));
                }
                if d.done || unread.len() >= limit {
                    break true;
                }
                if d.consumed == 0 || scanned == unread.len() {
                    break false;
                }
            },
        };
        if enough {
            return Ok(());
        }
        // Room for the rest, up to the limit, grown a step at a time as bytes come (a head
        // announcing 64 KiB reserves nothing it has not been sent).
        let want = match framing {
            BodyFraming::Length(n) => (n.min(limit as u64) as usize).saturating_sub(unread.len()),
            _ => limit - unread.len(),
        };
        let step = want.clamp(4096, BUFFER_READ_BYTES_MAX);
        c.io.fill_paced(&mut c.rb, step, w.settings.body_read, pace)
            .await
            .map_err(|e| e.on(Side::Client))?;
    }
}
