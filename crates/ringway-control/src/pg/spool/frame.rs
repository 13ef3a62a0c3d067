//! Spool frames on disk: encoding, checking, and finding the next whole frame after damage.
//!
//! ```text
//! RWL2: magic u32 | body length u32 | crc32(body) u32 | rows u32 | first row seq u64
//!       | crc32(the 24 bytes before) u32 | body = id length u16 | id | COPY rows
//! RWL1: magic u32 | body length u32 | crc32(body) u32 | body = id length u16 | id | rows u32
//!       | COPY rows                                   (read only: written by earlier versions)
//! ```
//!
//! All integers little-endian. The RWL2 header checks itself, so a frame whose body is damaged
//! still tells how many rows it held and where they sit in the row sequence.

use super::Batch;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC_V1: u32 = 0x5257_4c31; // "RWL1"
const MAGIC_V2: u32 = 0x5257_4c32; // "RWL2"
const HEAD_V1_BYTES: usize = 12;
pub const HEAD_V2_BYTES: usize = 28;
/// Smallest body: an empty id (RWL2), or an empty id and the row count (RWL1).
const BODY_V1_MIN_BYTES: usize = 6;
const BODY_V2_MIN_BYTES: usize = 2;
/// Largest frame body accepted on read (a corrupt length cannot make us allocate more).
pub const FRAME_BYTES_MAX: usize = 256 << 20;
/// Bytes read from a segment at a time when walking or scanning it.
const WINDOW_BYTES: usize = 1 << 20;

/// CRC-32 (IEEE), one table lookup per byte: a start reads the whole spool once.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// Size of the RWL2 frame of a batch, and its body.
pub fn frame_bytes(b: &Batch) -> (usize, usize) {
    let body = 2 + b.id.len() + b.data.len();
    (HEAD_V2_BYTES + body, body)
}

/// The RWL2 frame of `b`, whose first row is row `first_row_seq` of the spool.
pub fn encode(b: &Batch, first_row_seq: u64) -> Vec<u8> {
    let (len, body_len) = frame_bytes(b);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&MAGIC_V2.to_le_bytes());
    f.extend_from_slice(&(body_len as u32).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&b.rows.to_le_bytes());
    f.extend_from_slice(&first_row_seq.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&(b.id.len() as u16).to_le_bytes());
    f.extend_from_slice(b.id.as_bytes());
    f.extend_from_slice(&b.data);
    let body_crc = crc32(&f[HEAD_V2_BYTES..]);
    f[8..12].copy_from_slice(&body_crc.to_le_bytes());
    let head_crc = crc32(&f[..24]);
    f[24..28].copy_from_slice(&head_crc.to_le_bytes());
    f
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from(u32_at(b, i)) | (u64::from(u32_at(b, i + 4)) << 32)
}

fn is_magic(w: &[u8]) -> bool {
    let m = u32_at(w, 0);
    m == MAGIC_V1 || m == MAGIC_V2
}

/// An RWL2 header whose own CRC checks out (its body may not).
#[derive(Debug, Clone, Copy)]
struct HeadV2 {
    body_len: usize,
    body_crc: u32,
    rows: u32,
    first_row_seq: u64,
}

fn parse_head_v2(h: &[u8]) -> Option<HeadV2> {
    let head = HeadV2 {
        body_len: u32_at(h, 4) as usize,
        body_crc: u32_at(h, 8),
        rows: u32_at(h, 12),
        first_row_seq: u64_at(h, 16),
    };
    let plausible = (BODY_V2_MIN_BYTES..=FRAME_BYTES_MAX).contains(&head.body_len);
    (u32_at(h, 0) == MAGIC_V2 && crc32(&h[..24]) == u32_at(h, 24) && plausible).then_some(head)
}

/// Length of the id at the start of a body, if the body can hold it and it is UTF-8;
/// `after` bytes must follow it.
fn id_len(body: &[u8], after: usize) -> Option<usize> {
    let n = usize::from(u16::from_le_bytes([*body.first()?, *body.get(1)?]));
    (2 + n + after <= body.len() && std::str::from_utf8(&body[2..2 + n]).is_ok()).then_some(n)
}

/// A whole frame: both checksums hold and its body parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub offset: u64,
    /// Header and body.
    pub len: u64,
    pub rows: u32,
    /// Rows spooled before this frame; None for RWL1 frames, which do not say.
    pub first_row_seq: Option<u64>,
}

impl FrameInfo {
    pub fn end_row_seq(&self) -> Option<u64> {
        // Saturating: a header names any first row its CRC covers.
        self.first_row_seq
            .map(|s| s.saturating_add(u64::from(self.rows)))
    }
}

/// What is at an offset.
#[derive(Debug)]
pub enum Probe {
    Whole(FrameInfo),
    /// An RWL2 header that checks out, with a body that does not (torn or corrupt).
    Head {
        first_row_seq: u64,
        rows: u32,
    },
    Nothing,
}

/// Bytes between whole frames that hold none: torn or corrupt frames, or foreign bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Damage {
    pub start: u64,
    /// Where the next whole frame starts, or the end of the segment.
    pub end: u64,
    /// Frames the damage holds: the headers that still check out, at least one.
    pub frames: u64,
    /// Lowest first row and highest end row of those headers.
    pub lo: Option<u64>,
    pub hi: Option<u64>,
}

impl Damage {
    fn note_head(&mut self, first: u64, rows: u32) {
        self.frames += 1;
        self.lo = Some(self.lo.map_or(first, |l| l.min(first)));
        let end = first.saturating_add(u64::from(rows));
        self.hi = Some(self.hi.map_or(end, |h| h.max(end)));
    }
}

/// Reads one segment file through a window of `WINDOW_BYTES`, up to the length the spool
/// knows (bytes past it are not ours to read yet).
#[derive(Debug)]
pub struct SegmentReader {
    file: File,
    len: u64,
    buf: Vec<u8>,
    buf_offset: u64,
}

impl SegmentReader {
    pub fn open(path: &Path, len: u64) -> io::Result<SegmentReader> {
        let file = File::open(path)?;
        // Cut from outside since the spool last looked: read what is there.
        let len = len.min(file.metadata()?.len());
        Ok(SegmentReader {
            file,
            len,
            buf: Vec::new(),
            buf_offset: 0,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// `n` bytes at `offset`, or None if the segment ends before.
    fn window(&mut self, offset: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let Some(end) = offset.checked_add(n as u64).filter(|e| *e <= self.len) else {
            return Ok(None);
        };
        let cached = offset >= self.buf_offset && end <= self.buf_offset + self.buf.len() as u64;
        if !cached {
            // n <= FRAME_BYTES_MAX + a header, and never more than the file holds.
            let want = (self.len - offset).min(n.max(WINDOW_BYTES) as u64) as usize;
            self.buf.resize(want, 0);
            let got = read_full(&self.file, &mut self.buf, offset)?;
            self.buf.truncate(got);
            self.buf_offset = offset;
            if got < n {
                return Ok(None);
            }
        }
        let from = (offset - self.buf_offset) as usize;
        Ok(Some(&self.buf[from..from + n]))
    }

    /// Whether a whole frame starts at `offset`.
    pub fn probe(&mut self, offset: u64) -> io::Result<Probe> {
        let Some(h) = self.window(offset, HEAD_V1_BYTES)? else {
            return Ok(Probe::Nothing);
        };
        match u32_at(h, 0) {
            MAGIC_V2 => self.probe_v2(offset),
            MAGIC_V1 => self.probe_v1(offset),
            _ => Ok(Probe::Nothing),
        }
    }

    fn probe_v2(&mut self, offset: u64) -> io::Result<Probe> {
        let Some(head) = self.window(offset, HEAD_V2_BYTES)?.and_then(parse_head_v2) else {
            return Ok(Probe::Nothing);
        };
        let torn = Probe::Head {
            first_row_seq: head.first_row_seq,
            rows: head.rows,
        };
        let body_at = offset + HEAD_V2_BYTES as u64;
        let Some(body) = self.window(body_at, head.body_len)? else {
            return Ok(torn);
        };
        if crc32(body) != head.body_crc || id_len(body, 0).is_none() {
            return Ok(torn);
        }
        Ok(Probe::Whole(FrameInfo {
            offset,
            len: (HEAD_V2_BYTES + head.body_len) as u64,
            rows: head.rows,
            first_row_seq: Some(head.first_row_seq),
        }))
    }

    fn probe_v1(&mut self, offset: u64) -> io::Result<Probe> {
        let Some(h) = self.window(offset, HEAD_V1_BYTES)? else {
            return Ok(Probe::Nothing);
        };
        let (body_len, crc) = (u32_at(h, 4) as usize, u32_at(h, 8));
        if !(BODY_V1_MIN_BYTES..=FRAME_BYTES_MAX).contains(&body_len) {
            return Ok(Probe::Nothing);
        }
        let Some(body) = self.window(offset + HEAD_V1_BYTES as u64, body_len)? else {
            return Ok(Probe::Nothing);
        };
        let Some(n) = id_len(body, 4).filter(|_| crc32(body) == crc) else {
            return Ok(Probe::Nothing);
        };
        Ok(Probe::Whole(FrameInfo {
            offset,
            len: (HEAD_V1_BYTES + body_len) as u64,
            rows: u32_at(body, 2 + n),
            first_row_seq: None,
        }))
    }

    /// The batch of a frame `probe` found whole.
    pub fn batch(&mut self, f: &FrameInfo) -> io::Result<Option<Batch>> {
        let v2 = f.first_row_seq.is_some();
        let head = if v2 { HEAD_V2_BYTES } else { HEAD_V1_BYTES };
        let body_len = (f.len as usize).saturating_sub(head);
        let Some(body) = self.window(f.offset + head as u64, body_len)? else {
            return Ok(None);
        };
        let after = if v2 { 0 } else { 4 };
        let Some(n) = id_len(body, after) else {
            return Ok(None);
        };
        Ok(Some(Batch {
            id: String::from_utf8_lossy(&body[2..2 + n]).into_owned(),
            rows: f.rows,
            data: body[2 + n + after..].to_vec(),
        }))
    }

    /// The damage starting at `start` (where no whole frame starts): scans forward, byte by
    /// byte from one magic number to the next, for a frame whose checksums hold.
    pub fn damage_at(&mut self, start: u64) -> io::Result<Damage> {
        let mut d = Damage {
            start,
            end: self.len,
            frames: 0,
            lo: None,
            hi: None,
        };
        let mut pos = start;
        while let Some(q) = self.find_magic(pos)? {
            match self.probe(q)? {
                Probe::Whole(_) if q > start => {
                    d.end = q;
                    break;
                }
                Probe::Head {
                    first_row_seq,
                    rows,
                } => d.note_head(first_row_seq, rows),
                _ => {}
            }
            pos = q + 1;
        }
        d.frames = d.frames.max(1);
        Ok(d)
    }

    /// The first offset at or after `pos` holding a magic number.
    fn find_magic(&mut self, mut pos: u64) -> io::Result<Option<u64>> {
        while pos + 4 <= self.len {
            // Search what the window holds from `pos` before reading more: candidates are
            // probed one after the other within it.
            let buf_end = self.buf_offset + self.buf.len() as u64;
            if pos < self.buf_offset || pos + 4 > buf_end {
                let n = (self.len - pos).min(WINDOW_BYTES as u64) as usize;
                if self.window(pos, n)?.is_none() {
                    return Ok(None);
                }
            }
            let w = &self.buf[(pos - self.buf_offset) as usize..];
            if let Some(i) = w.windows(4).position(is_magic) {
                return Ok(Some(pos + i as u64));
            }
            // The last 3 bytes may start a magic number cut by the window's end.
            pos += (w.len() as u64).saturating_sub(3).max(1);
        }
        Ok(None)
    }
}

/// Reads from `offset` until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
