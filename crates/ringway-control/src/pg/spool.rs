//! The log spool: batches the database could not take, in append-only segment files under a
//! disk quota, replayed oldest first.
//!
//! A segment is `spool-<seq>.seg`, a sequence of frames:
//! `magic u32 | body length u32 | crc32(body) u32 | body`, body = `id length u16 | id | rows
//! u32 | COPY rows`. Appends reach the disk with `fdatasync` at most every `SYNC_INTERVAL`
//! (and when the spool is dropped): a process crash loses nothing (the page cache has it), a
//! power loss at most that interval of rows, and an outage does not turn into one disk flush
//! per batch on the control thread. A frame that does not check out (a
//! crash mid-append) ends its segment: what follows it is not trusted and is counted as
//! dropped. Replayed batches are skipped by the database if they already landed (batch ids), so
//! replaying a segment twice after a crash duplicates nothing.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x5257_4c31; // "RWL1"
const FRAME_HEAD_BYTES: usize = 12;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Longest an appended frame waits for `fdatasync`.
pub const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Largest frame accepted on read (a corrupt length cannot make us allocate more).
pub const FRAME_BYTES_MAX: usize = 256 << 20;

/// A batch of COPY rows with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Unique per batch (node, start time, sequence): the database skips ids it has.
    pub id: String,
    pub rows: u32,
    /// Encoded rows (`copy::encode_row`), without header and trailer.
    pub data: Vec<u8>,
}

/// Why an append failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool quota reached ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    len: u64,
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    bytes_max: u64,
    /// Oldest first; the last one is the one appended to.
    segments: VecDeque<Segment>,
    tail: Option<File>,
    /// Read position in the oldest segment.
    read_offset: u64,
    /// Frames that could not be read back (torn or corrupt).
    pub corrupt_frames: u64,
    /// Lengths of the frames `peek_many` returned, not yet consumed.
    peeked: Vec<u64>,
    /// Appended since the last sync.
    unsynced_since: Option<std::time::Instant>,
}

pub fn crc32(data: &[u8]) -> u32 {
    // CRC-32 (IEEE), bitwise: spool frames are few and large, this is not a hot path.
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Spool {
    /// Opens (creating) the directory and finds the segments a previous run left.
    pub fn open(dir: &Path, bytes_max: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("spool-"))
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let len = entry.metadata().map_err(io_err(dir))?.len();
            segments.push(Segment {
                seq,
                path: entry.path(),
                len,
            });
        }
        segments.sort_by_key(|s| s.seq);
        Ok(Spool {
            dir: dir.to_path_buf(),
            bytes_max,
            segments: segments.into(),
            tail: None,
            read_offset: 0,
            corrupt_frames: 0,
            peeked: Vec::new(),
            unsynced_since: None,
        })
    }

    /// Bytes on disk not yet replayed.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum::<u64>() - self.read_offset
    }

    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    /// Appends a batch durably, or refuses it when the quota would be exceeded.
    pub fn append(&mut self, b: &Batch) -> Result<(), SpoolError> {
        let body_len = 2 + b.id.len() + 4 + b.data.len();
        let frame_len = (FRAME_HEAD_BYTES + body_len) as u64;
        let used: u64 = self.segments.iter().map(|s| s.len).sum();
        if used + frame_len > self.bytes_max || body_len > FRAME_BYTES_MAX {
            return Err(SpoolError::Full {
                used,
                max: self.bytes_max,
            });
        }
        let needs_new = match self.segments.back() {
            None => true,
            Some(s) => self.tail.is_none() || s.len + frame_len > SEGMENT_BYTES_MAX,
        };
        if needs_new {
            let seq = self.segments.back().map_or(1, |s| s.seq + 1);
            let path = self.dir.join(format!("spool-{seq:016}.seg"));
            let f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            self.tail = Some(f);
            self.segments.push_back(Segment { seq, path, len: 0 });
        }
        let mut frame = Vec::with_capacity(frame_len as usize);
        frame.extend_from_slice(&MAGIC.to_le_bytes());
        frame.extend_from_slice(&(body_len as u32).to_le_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(&(b.id.len() as u16).to_le_bytes());
        frame.extend_from_slice(b.id.as_bytes());
        frame.extend_from_slice(&b.rows.to_le_bytes());
        frame.extend_from_slice(&b.data);
        let crc = crc32(&frame[FRAME_HEAD_BYTES..]);
        frame[8..12].copy_from_slice(&crc.to_le_bytes());
        let (Some(f), Some(seg)) = (self.tail.as_mut(), self.segments.back_mut()) else {
            unreachable!("a tail segment was just ensured");
        };
        if let Err(e) = f.write_all(&frame) {
            // Leave no partial frame behind (it would end the segment on replay): cut the
            // file back, and start a new segment for the next append.
            let _ = f.set_len(seg.len);
            self.tail = None;
            return Err(SpoolError::Io {
                path: seg.path.display().to_string(),
                source: e,
            });
        }
        seg.len += frame_len;
        let since = *self
            .unsynced_since
            .get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    /// Syncs if frames have waited `SYNC_INTERVAL`.
    pub fn sync_if_due(&mut self) -> Result<(), SpoolError> {
        if self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= SYNC_INTERVAL)
        {
            self.sync()?;
        }
        Ok(())
    }

    /// Flushes appended frames to the disk.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced_since.take().is_some()
            && let (Some(f), Some(seg)) = (self.tail.as_ref(), self.segments.back())
        {
            f.sync_data().map_err(io_err(&seg.path))?;
        }
        Ok(())
    }

    /// Up to `max_batches` of the oldest batches (from one segment, at most `max_bytes` of
    /// rows beyond the first), in order; `consume` then removes them.
    pub fn peek_many(
        &mut self,
        max_batches: usize,
        max_bytes: usize,
    ) -> Result<Vec<Batch>, SpoolError> {
        self.peeked.clear();
        let Some(first) = self.peek_first()? else {
            return Ok(Vec::new());
        };
        let Some(seg) = self.segments.front() else {
            return Ok(Vec::new());
        };
        let path = seg.path.clone();
        let seg_len = seg.len;
        let mut offset = self.read_offset;
        let mut bytes = first.data.len();
        let mut out = Vec::new();
        // `peek` validated the first frame; read it again for its length.
        if let Some((_, len)) = read_frame(&path, offset)? {
            self.peeked.push(len);
            offset += len;
        }
        out.push(first);
        while out.len() < max_batches && offset < seg_len {
            match read_frame(&path, offset)? {
                Some((b, len)) if bytes + b.data.len() <= max_bytes => {
                    bytes += b.data.len();
                    self.peeked.push(len);
                    offset += len;
                    out.push(b);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// The oldest batch not yet consumed. Corrupt data ends a segment (counted); the
    /// segment is then discarded.
    pub fn peek(&mut self) -> Result<Option<Batch>, SpoolError> {
        self.peeked.clear();
        self.peek_first()
    }

    fn peek_first(&mut self) -> Result<Option<Batch>, SpoolError> {
        loop {
            let Some(seg) = self.segments.front() else {
                return Ok(None);
            };
            if self.read_offset >= seg.len {
                if self.segments.len() == 1 && self.tail.is_some() {
                    // The tail is fully read: nothing pending.
                    return Ok(None);
                }
                self.drop_front()?;
                continue;
            }
            match read_frame(&seg.path, self.read_offset)? {
                Some((batch, _)) => return Ok(Some(batch)),
                None => {
                    tracing::error!(segment = %seg.path.display(), offset = self.read_offset, "spool segment corrupt after this offset; the rest of it is discarded");
                    self.corrupt_frames += 1;
                    let len = seg.len;
                    self.read_offset = len;
                    if self.segments.len() == 1 {
                        // Never append after garbage.
                        self.tail = None;
                    }
                }
            }
        }
    }

    /// Marks the batch `peek` returned as written.
    pub fn consume(&mut self) -> Result<(), SpoolError> {
        let Some(seg) = self.segments.front() else {
            return Ok(());
        };
        if self.peeked.is_empty() {
            if let Some((_, len)) = read_frame(&seg.path, self.read_offset)? {
                self.read_offset += len;
            }
        } else {
            self.read_offset += self.peeked.drain(..).sum::<u64>();
        }
        let seg_len = seg.len;
        if self.read_offset >= seg_len {
            if self.segments.len() == 1 {
                // Everything is replayed: start over with an empty directory.
                self.tail = None;
            }
            self.drop_front()?;
        }
        Ok(())
    }

    fn drop_front(&mut self) -> Result<(), SpoolError> {
        self.peeked.clear();
        if let Some(seg) = self.segments.pop_front() {
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        self.read_offset = 0;
        Ok(())
    }
}

/// Reads the frame at `offset`: the batch and the frame's length, or None if it is torn or
/// corrupt.
fn read_frame(path: &Path, offset: u64) -> Result<Option<(Batch, u64)>, SpoolError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    let mut head = [0u8; FRAME_HEAD_BYTES];
    if f.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let (magic, len, crc) = (word(0), word(4) as usize, word(8));
    if magic != MAGIC || !(6..=FRAME_BYTES_MAX).contains(&len) {
        return Ok(None);
    }
    let mut body = vec![0u8; len];
    if f.read_exact(&mut body).is_err() || crc32(&body) != crc {
        return Ok(None);
    }
    let id_len = usize::from(u16::from_le_bytes([body[0], body[1]]));
    if 2 + id_len + 4 > len {
        return Ok(None);
    }
    let Ok(id) = std::str::from_utf8(&body[2..2 + id_len]) else {
        return Ok(None);
    };
    let r = 2 + id_len;
    let rows = u32::from_le_bytes([body[r], body[r + 1], body[r + 2], body[r + 3]]);
    Ok(Some((
        Batch {
            id: id.to_string(),
            rows,
            data: body[r + 4..].to_vec(),
        },
        (FRAME_HEAD_BYTES + len) as u64,
    )))
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(i: u32) -> Batch {
        Batch {
            id: format!("b{i}"),
            rows: i,
            data: vec![i as u8; 100 + i as usize],
        }
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn replays_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            s.append(&batch(i)).unwrap();
        }
        assert_eq!(s.peek().unwrap(), Some(batch(0)));
        s.consume().unwrap();
        drop(s);
        // A restart replays from the start of the oldest segment (the database skips ids it
        // already has).
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut seen = Vec::new();
        while let Some(b) = s.peek().unwrap() {
            seen.push(b.rows);
            s.consume().unwrap();
        }
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        for i in 10..20 {
            s.append(&batch(i)).unwrap();
        }
        let some = s.peek_many(4, 1 << 20).unwrap();
        assert_eq!(
            some.iter().map(|b| b.rows).collect::<Vec<_>>(),
            [10, 11, 12, 13]
        );
        s.consume().unwrap();
        let rest = s.peek_many(100, 1 << 20).unwrap();
        assert_eq!(
            rest.iter().map(|b| b.rows).collect::<Vec<_>>(),
            (14..20).collect::<Vec<_>>()
        );
        s.consume().unwrap();
        assert!(s.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "replayed segments are deleted"
        );
        // Appending works again after a full replay.
        s.append(&batch(9)).unwrap();
        assert_eq!(s.peek().unwrap(), Some(batch(9)));
    }

    #[test]
    fn quota_refuses_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 400).unwrap();
        s.append(&batch(1)).unwrap();
        s.append(&batch(2)).unwrap();
        assert!(matches!(
            s.append(&batch(200)),
            Err(SpoolError::Full { .. })
        ));
        drop(s);
        // A crash mid-append: half a frame at the end.
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&MAGIC.to_le_bytes()).unwrap();
        f.write_all(&[50, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut seen = Vec::new();
        while let Some(b) = s.peek().unwrap() {
            seen.push(b.rows);
            s.consume().unwrap();
        }
        assert_eq!(seen, [1, 2]);
        assert_eq!(s.corrupt_frames, 1);
    }
}
