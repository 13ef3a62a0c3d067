//! Phase 1, head: bytes are scanned as they arrive, resuming where the last read stopped,
//! until the request head is complete (`ringway-proto`'s `HeadScanner`: bare CR/LF and NUL
//! refused at once, `limits.request_line_bytes_max` 414, `limits.header_bytes_max` 431), within
//! `timeouts.header_read_ms` (408).

use super::Client;
use super::answer::Answer;
use super::record::Exchange;
use crate::client::ClientIo;
use crate::error::IoFail;
use crate::worker::Worker;
use ringway_proto::HeadError;
use ringway_proto::head::HeadScanner;
use std::time::Instant;

/// How the head phase ended.
pub(super) enum Head {
    /// `c.rb.buf[..n]` is a complete head.
    Complete(usize),
    /// The client closed, or went quiet, before a request: nothing to answer.
    Gone,
    Refused(Answer),
}

/// Reads until `c.rb` holds a complete head, by `deadline`.
pub(super) async fn read(
    w: &Worker,
    c: &mut Client<impl ClientIo>,
    deadline: Instant,
    ex: &mut Exchange,
) -> Head {
    let mut scanner = HeadScanner::new();
    // The head stalled once: from then on the connection waits for readability without a
    // buffer before every read (which then completes at once), never in a hot read.
    let mut stalled = false;
    let timed_out = || Head::Refused(slow_head());
    loop {
        match scanner.scan(&c.rb.buf, &w.settings.head) {
            Ok(Some(n)) => return Head::Complete(n),
            Ok(None) => {}
            Err(e) => return Head::Refused(Answer::error(e.status(), reason(e)).closing()),
        }
        let now = Instant::now();
        let Some(left) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return if c.rb.buf.is_empty() {
                Head::Gone
            } else {
                timed_out()
            };
        };
        let min_free = 1024.min(w.settings.head.header_bytes_max);
        if stalled && !stalled_wait(w, c, deadline).await {
            return timed_out();
        }
        // A head that stalls for a hot read waits for the rest without a posted buffer.
        let hot = w.settings.hot_read;
        let may_stall = !stalled && !hot.is_zero() && hot < left && !c.rb.buf.is_empty();
        match c
            .io
            .fill(&mut c.rb, min_free, if may_stall { hot } else { left })
            .await
        {
            Ok(_) => {}
            Err(IoFail::Timeout) if may_stall => stalled = true,
            Err(IoFail::Timeout) if !c.rb.buf.is_empty() => return timed_out(),
            Err(_) => {
                if !c.rb.buf.is_empty() {
                    // A partial head and then EOF: nothing to answer, but it was a request.
                    ex.status = 400;
                    ex.reason = "client_closed";
                    ex.bytes_in = c.rb.buf.len() as u64;
                    ex.finish(w, &c.rb.buf);
                }
                return Head::Gone;
            }
        }
    }
}

/// 408 for a head not complete in time. The connection closes without draining: a client
/// too slow to finish its head has nothing unread worth waiting for (slowloris clients come
/// by the thousand, and each drain would hold a buffer).
fn slow_head() -> Answer {
    Answer {
        drain: false,
        ..Answer::error(408, "header_timeout").closing()
    }
}

/// Waits for more of a head that stalled (a slowloris client sends a line every few seconds)
/// without holding a read buffer, as an idle connection does: the bytes so far move into a
/// buffer of their own size, the pooled one goes back, and the socket is polled for
/// readability. A stalled head then costs its bytes and its task, not `limits.buffer_bytes`.
/// False: the deadline passed, the client closed, or shutdown.
async fn stalled_wait(w: &Worker, c: &mut Client<impl ClientIo>, deadline: Instant) -> bool {
    debug_assert_eq!(c.rb.pos, 0, "a head being read is still at the front");
    if c.io.io.has_buffered() {
        // TLS bytes above the socket: a readability poll would not see them.
        return true;
    }
    if c.rb.buf.capacity() > c.rb.buf.len() {
        let kept = c.rb.buf.to_vec();
        w.bufs.put(std::mem::replace(&mut c.rb.buf, kept));
    }
    c.io.release();
    let left = deadline.saturating_duration_since(Instant::now());
    crate::conn::idle_wait(w, c.io.io.socket(), left).await
}

/// The log reason of a refused head.
pub(super) fn reason(e: HeadError) -> &'static str {
    match e {
        HeadError::RequestLineTooLong => "request_line_too_long",
        HeadError::HeadTooLarge | HeadError::TooManyHeaders => "header_too_large",
        HeadError::BareLineBreak | HeadError::Nul => "bad_line_break",
        HeadError::Version => "bad_version",
        HeadError::MissingHost | HeadError::DuplicateHost | HeadError::InvalidHost => "bad_host",
        HeadError::InvalidContentLength
        | HeadError::DuplicateContentLength
        | HeadError::LengthWithTransferEncoding
        | HeadError::ChunkedNotLast
        | HeadError::UnsupportedCoding
        | HeadError::TransferEncodingInHttp10 => "bad_framing",
        _ => "bad_request",
    }
}
