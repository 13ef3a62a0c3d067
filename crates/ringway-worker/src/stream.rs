//! Moving bodies and tunnels between the two sockets of an exchange.
//!
//! [`pump`] streams one body: it decodes the source framing (length, chunked, until close) and
//! encodes the destination framing (raw or chunked), reading only after the previous bytes
//! were written, so a slow side slows the other down and memory stays at one or two buffers
//! per exchange whatever the body size. Large raw pieces are written straight from the receive
//! buffer; small ones and chunked output are gathered in `out`, which may already hold the
//! head, so a small message leaves in one write.

use crate::deadline::Deadlines;
use crate::error::{ErrorKind, IoFail, ProxyError, Side};
use crate::io::{BufPool, RecvBuf, Timed};
use crate::io::{ReadIo, WriteIo};
use crate::pace::Pace;
use monoio::io::Splitable;
use monoio::net::TcpStream;
use ringway_proto::ChunkedDecoder;
use ringway_proto::chunked::{CHUNK_DATA_END, LAST_CHUNK, write_chunk_size};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Source framing.
#[derive(Debug)]
pub enum Decode {
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the source closes (responses only).
    Close,
}

/// Destination framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encode {
    Raw,
    Chunked,
}

/// Raw pieces at least this large skip the gather buffer and are written from the receive
/// buffer directly.
const DIRECT_WRITE_BYTES_MIN: usize = 4096;
/// Room kept in `out` for a chunk-size line and its CRLFs.
const CHUNK_OVERHEAD_BYTES: usize = 32;

/// One side of a pump.
#[derive(Debug)]
pub struct End<'a, S> {
    pub io: &'a mut Timed<S>,
    pub side: Side,
    /// Longest wait for one read or write.
    pub timeout: Duration,
    /// The client's rate floor on this side (see `crate::pace`): None for upstreams.
    pub pace: Option<&'a mut Pace>,
}

impl<'a, S> End<'a, S> {
    pub fn new(io: &'a mut Timed<S>, side: Side, timeout: Duration) -> Self {
        Self {
            io,
            side,
            timeout,
            pace: None,
        }
    }

    pub fn paced(mut self, pace: &'a mut Pace) -> Self {
        self.pace = Some(pace);
        self
    }
}

/// Byte counts of a pump.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pumped {
    /// Bytes read from the source socket during the pump.
    pub read: u64,
    /// Bytes written to the destination socket (including anything already in `out`).
    pub written: u64,
    /// Body bytes (decoded).
    pub body: u64,
}

/// Streams a body from `src` to `dst`. `sbuf` holds bytes already read from the source (its
/// unread part starts the body); on return its unread part is whatever followed the body.
/// `out` is flushed before returning. `body_max` bounds the decoded body (chunked requests).
#[allow(clippy::too_many_arguments)]
pub async fn pump<R, W>(
    mut src: End<'_, R>,
    sbuf: &mut RecvBuf,
    mut dst: End<'_, W>,
    out: &mut Vec<u8>,
    mut decode: Decode,
    encode: Encode,
    body_max: Option<u64>,
    bufs: &BufPool,
) -> (Result<(), ProxyError>, Pumped)
where
    R: ReadIo + crate::io::Wire,
    W: WriteIo + crate::io::Wire,
{
    let mut n = Pumped::default();
    // Chunked output is gathered: give it a body-sized buffer, so it leaves in large writes.
    if encode == Encode::Chunked && out.capacity() < bufs.big_bytes() {
        let mut big = bufs.take_big();
        big.extend_from_slice(out);
        bufs.put(std::mem::replace(out, big));
    }
    let flush_at = out.capacity().max(bufs.buffer_bytes());
    macro_rules! flush {
        () => {
            if !out.is_empty() {
                let len = out.len();
                let (r, b) = dst
                    .io
                    .write_range_paced(
                        std::mem::take(out),
                        0,
                        len,
                        dst.timeout,
                        dst.pace.as_deref_mut(),
                    )
                    .await;
                *out = b;
                n.written += out.len() as u64;
                out.clear();
                if let Err(e) = r {
                    return (Err(e.on(dst.side)), n);
                }
            }
        };
    }
    let mut src_done = false;
    loop {
        // How much input one step may turn into output without growing `out`.
        let room = out
            .capacity()
            .saturating_sub(out.len() + CHUNK_OVERHEAD_BYTES);
        if sbuf.has_unread() && room < 1024 && !out.is_empty() {
            flush!();
            continue;
        }
        let mut piece = None;
        let mut done = src_done;
        if sbuf.has_unread() && !done {
            let unread = sbuf.unread();
            match &mut decode {
                Decode::Length(rem) => {
                    let direct = encode == Encode::Raw && out.is_empty();
                    let cap = if direct {
                        unread.len()
                    } else {
                        unread.len().min(room.max(1))
                    };
                    let take = (*rem).min(cap as u64) as usize;
                    piece = Some((sbuf.pos, take));
                    *rem -= take as u64;
                    done = *rem == 0;
                    sbuf.consume(take);
                }
                Decode::Close => {
                    let direct = encode == Encode::Raw && out.is_empty();
                    let take = if direct {
                        unread.len()
                    } else {
                        unread.len().min(room.max(1))
                    };
                    piece = Some((sbuf.pos, take));
                    sbuf.consume(take);
                }
                Decode::Chunked(dec) => {
                    let direct = encode == Encode::Raw && out.is_empty();
                    let limit = if direct {
                        unread.len()
                    } else {
                        unread.len().min(room.max(1))
                    };
                    let d = match dec.decode(&unread[..limit]) {
                        Ok(d) => d,
                        Err(_) => {
                            return (Err(ProxyError::new(src.side, ErrorKind::Protocol)), n);
                        }
                    };
                    piece = d.data.map(|(s, l)| (sbuf.pos + s, l));
                    sbuf.consume(d.consumed);
                    done = d.done;
                }
            }
        }
        if let Some((start, len)) = piece
            && len > 0
        {
            n.body += len as u64;
            if let Some(max) = body_max
                && n.body > max
            {
                return (Err(ProxyError::new(src.side, ErrorKind::BodyTooLarge)), n);
            }
            match encode {
                Encode::Raw if out.is_empty() && len >= DIRECT_WRITE_BYTES_MIN => {
                    let (r, b) = dst
                        .io
                        .write_range_paced(
                            std::mem::take(&mut sbuf.buf),
                            start,
                            start + len,
                            dst.timeout,
                            dst.pace.as_deref_mut(),
                        )
                        .await;
                    sbuf.buf = b;
                    if let Err(e) = r {
                        return (Err(e.on(dst.side)), n);
                    }
                    n.written += len as u64;
                }
                Encode::Raw => out.extend_from_slice(&sbuf.buf[start..start + len]),
                Encode::Chunked => {
                    write_chunk_size(len, out);
                    out.extend_from_slice(&sbuf.buf[start..start + len]);
                    out.extend_from_slice(CHUNK_DATA_END);
                }
            }
            if out.len() >= flush_at {
                flush!();
            }
        }
        if done {
            if encode == Encode::Chunked {
                out.extend_from_slice(LAST_CHUNK);
            }
            flush!();
            return (Ok(()), n);
        }
        if sbuf.has_unread() {
            continue;
        }
        // Everything read so far is forwarded or gathered: send it before waiting for more, so
        // the destination sees progress and back-pressure holds.
        flush!();
        // A body larger than the room left is streamed through a body-sized buffer.
        let rest_fits = match &decode {
            Decode::Length(rem) => *rem <= sbuf.free() as u64,
            _ => false,
        };
        if !rest_fits && sbuf.buf.capacity() < bufs.big_bytes() {
            let small = sbuf.upgrade(bufs.take_big());
            bufs.put(small);
        }
        let filled = match src.pace.as_deref_mut() {
            Some(p) => src.io.fill_paced(sbuf, 4096, src.timeout, p).await,
            None => src.io.fill(sbuf, 4096, src.timeout).await,
        };
        match filled {
            Ok(k) => n.read += k as u64,
            Err(IoFail::Closed) if matches!(decode, Decode::Close) => src_done = true,
            Err(e) => return (Err(e.on(src.side)), n),
        }
    }
}

/// Byte counts of a tunnel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tunneled {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Relays bytes both ways after a 101 until both directions have ended or nothing moved in
/// either direction for `idle`. Each direction ends on EOF by shutting down the other side's
/// write half, so half-closed WebSocket closes work.
pub async fn tunnel(
    deadlines: &Rc<Deadlines>,
    client: TcpStream,
    upstream: TcpStream,
    buffers: (Vec<u8>, Vec<u8>),
    idle: Duration,
    write_timeout: Duration,
) -> (Tunneled, (Vec<u8>, Vec<u8>)) {
    let last = Cell::new(Instant::now());
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = relay(
        Timed::new(cr, deadlines.clone()),
        Timed::new(uw, deadlines.clone()),
        buffers.0,
        &last,
        idle,
        write_timeout,
    );
    let down = relay(
        Timed::new(ur, deadlines.clone()),
        Timed::new(cw, deadlines.clone()),
        buffers.1,
        &last,
        idle,
        write_timeout,
    );
    let ((a, ba), (b, bb)) = monoio::join!(up, down);
    (
        Tunneled {
            client_to_upstream: a,
            upstream_to_client: b,
        },
        (ba, bb),
    )
}

async fn relay<R, W>(
    mut from: Timed<R>,
    mut to: Timed<W>,
    mut buf: Vec<u8>,
    last: &Cell<Instant>,
    idle: Duration,
    write_timeout: Duration,
) -> (u64, Vec<u8>)
where
    R: ReadIo,
    W: WriteIo,
{
    let mut total = 0u64;
    loop {
        buf.clear();
        let (r, b) = from.read_append(buf, idle).await;
        buf = b;
        match r {
            Ok(0) => break,
            Ok(k) => {
                last.set(Instant::now());
                let (w, b) = to.write_all(buf, write_timeout).await;
                buf = b;
                if w.is_err() {
                    break;
                }
                total += k as u64;
            }
            Err(IoFail::Timeout) if last.get().elapsed() < idle => continue,
            Err(_) => break,
        }
    }
    // Dropping `to` (a write half) shuts down its write side: the peer sees EOF.
    drop(to);
    (total, buf)
}
