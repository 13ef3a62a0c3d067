//! What an exchange leaves behind: the facts its log record and answers need, gathered as the
//! phases go. Strings point into the client receive buffer (the request head) instead of being
//! copied.

use crate::access::REQUEST_ID_BYTES_MAX;
use crate::route::{HostName, Target};
use crate::worker::Worker;
use ringway_core::LogEntry;
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

/// A byte range of the request head.
pub(super) type Span = (usize, usize);

/// Where a logged string is: in the head, or one the parser made up (`/` for an absolute-form
/// target without a path, `*` for `OPTIONS` of a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Text {
    Head(Span),
    Static(&'static [u8]),
}

impl Text {
    /// `part`'s place in `base`; a part that is not in it is one of the parser's own.
    pub(super) fn of(base: &[u8], part: &[u8]) -> Self {
        match span_of(base, part) {
            Some(s) => Text::Head(s),
            None if part == b"*" => Text::Static(b"*"),
            None => Text::Static(b"/"),
        }
    }

    fn get<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        match *self {
            Text::Head(s) => slice(head, s),
            Text::Static(t) => t,
        }
    }
}

pub(super) fn span_of(base: &[u8], part: &[u8]) -> Option<Span> {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    (start <= base.len() && start + part.len() <= base.len()).then_some((start, part.len()))
}

fn slice(buf: &[u8], s: Span) -> &[u8] {
    buf.get(s.0..s.0 + s.1).unwrap_or(b"")
}

/// What the log record and the answers of one exchange need.
#[derive(Debug)]
pub struct Exchange {
    start: Instant,
    start_unix_us: u64,
    rid: [u8; REQUEST_ID_BYTES_MAX],
    rid_len: usize,
    pub(super) method: Span,
    pub(super) path: Text,
    pub(super) user_agent: Span,
    pub(super) host: HostName,
    pub(super) client_ip: IpAddr,
    /// The client asked for JSON (error pages in JSON).
    pub(super) json: bool,
    pub(super) head_request: bool,
    /// The client lets the connection stay open after this exchange (false until the head
    /// parsed).
    pub(super) keep_alive: bool,
    pub(super) target: Option<Target>,
    /// The endpoint whose in-flight count this exchange holds (one attempt at a time).
    pub(super) lease: Option<ringway_core::balance::EndpointRef>,
    /// An upstream was contacted (the log names it only then: a redirect or a refused body
    /// has a route but no upstream).
    pub(super) contacted: bool,
    /// Visitor and session ids, and the cookies that keep them (policy phase).
    pub ids: crate::policy::Ids,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reason: &'static str,
}

impl Exchange {
    pub(super) fn new(w: &Worker, peer: IpAddr) -> Self {
        let start_unix_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut rid = [0u8; REQUEST_ID_BYTES_MAX];
        let gen_id = w.ids.borrow_mut().next_id();
        rid[..gen_id.len()].copy_from_slice(&gen_id);
        Self {
            start: Instant::now(),
            start_unix_us,
            rid,
            rid_len: gen_id.len(),
            method: (0, 0),
            path: Text::Head((0, 0)),
            user_agent: (0, 0),
            host: HostName::empty(),
            client_ip: ringway_core::cidr::canonical(peer),
            json: false,
            head_request: false,
            keep_alive: false,
            target: None,
            lease: None,
            contacted: false,
            ids: crate::policy::Ids::default(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            reason: "",
        }
    }

    /// When the exchange began.
    pub(super) fn started(&self) -> Instant {
        self.start
    }

    pub fn request_id(&self) -> &[u8] {
        &self.rid[..self.rid_len]
    }

    /// Takes a trusted peer's request id.
    pub(super) fn set_request_id(&mut self, id: &[u8]) {
        debug_assert!(id.len() <= REQUEST_ID_BYTES_MAX);
        self.rid[..id.len()].copy_from_slice(id);
        self.rid_len = id.len();
    }

    /// Sets the status and the reason, keeping a reason already given.
    pub(super) fn end_with(&mut self, status: u16, reason: &'static str) {
        if self.status == 0 {
            self.status = status;
        }
        if self.reason.is_empty() {
            self.reason = reason;
        }
    }

    /// Counts the exchange and pushes its log record. `head` is the client receive buffer.
    pub fn finish(&self, w: &Worker, head: &[u8]) {
        let duration_us = self.start.elapsed().as_micros() as u64;
        w.stats.record_request(self.status, duration_us);
        if let Some(t) = self.target {
            let ev = ringway_core::balance::stats::RouteEvent::Response {
                status: self.status,
                latency_us: duration_us,
            };
            w.route_event(t.stats, ev);
        }
        w.stats.bytes_in.add(self.bytes_in);
        w.stats.bytes_out.add(self.bytes_out);
        w.log(&LogEntry {
            time_unix_us: self.start_unix_us,
            duration_us,
            request_id: self.request_id(),
            host: self.host.as_bytes(),
            method: slice(head, self.method),
            path: self.path.get(head),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            upstream: self
                .target
                .filter(|_| self.contacted)
                .and_then(|t| t.upstream()),
            client_ip: self.client_ip,
            user_agent: slice(head, self.user_agent),
            route: self.target.map(|t| t.ids),
            worker: w.id as u16,
            reason: self.reason.as_bytes(),
            visitor_id: self.ids.visitor(),
            session_id: self.ids.session(),
        });
    }
}
