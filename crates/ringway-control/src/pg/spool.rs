//! The log spool: batches the database could not take, in append-only segment files under a
//! disk quota, replayed oldest first.
//!
//! A segment is `spool-<seq>-<first row>.seg`, a sequence of frames (`frame`: an RWL2 header that carries
//! its own CRC, the row count and the frame's place in the spool's row sequence, then the
//! body with its CRC). Appends reach the disk with `fdatasync` at most every `SYNC_INTERVAL`
//! (and when the spool is dropped): a process crash loses nothing (the page cache has it), a
//! power loss at most that interval of rows, and an outage does not turn into one disk flush
//! per batch on the control thread.
//!
//! Damage costs only the frames it hits. The reader skips bytes that do not form a whole frame
//! up to the next one whose checksums hold; the rows lost are the hole in the row sequence
//! between the whole frames around the damage, counted once (`rows_lost`) whether open, the
//! writer or the reader finds it first. The writer writes at its own offset and checks the
//! file's length before each append, read and deletion of a read segment, and at each
//! `tick`: it never appends after bytes it did not write, and a failed write is cut back to
//! the last whole frame. Replayed batches are skipped by the database if they already landed
//! (batch ids), so replaying a segment twice duplicates nothing.

mod frame;

use frame::{Damage, FrameInfo, Probe, SegmentReader};
pub use frame::{FRAME_BYTES_MAX, crc32};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Longest an appended frame waits for `fdatasync`.
pub const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Damaged stretches and lost row ranges remembered ahead of the reader, so that it does not
/// count again what open or the writer counted. Past it they are left for the reader to count.
const DAMAGE_TRACKED_MAX: usize = 65_536;

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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Bytes that belong to the spool: what this process wrote, or found at open or after an
    /// outside change.
    len: u64,
    /// Rows spooled before its first frame, when known: from the file name
    /// (`spool-<seq>-<first row>.seg`; earlier versions wrote `spool-<seq>.seg`), or from the
    /// segments before it.
    start_row_seq: Option<u64>,
}

/// Where a walk through the spool stands in the row sequence.
#[derive(Debug, Clone, Copy, Default)]
struct Chain {
    /// Every row before this one is accounted for (passed, or counted lost). None until a
    /// frame of known place is seen (at the start, or after RWL1 frames).
    seq: Option<u64>,
    /// Highest end row of the damaged frames passed since the last whole one.
    damaged_hi: Option<u64>,
}

impl Chain {
    fn at(seq: Option<u64>) -> Chain {
        Chain {
            seq,
            damaged_hi: None,
        }
    }
}

/// Who walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Checking ahead of the reader (at open, after an outside change): counts only what it
    /// can remember, so that the reader passing the same damage does not count it again.
    Ahead,
    /// The reader: counts what was not counted ahead, and forgets what it passes.
    Read,
}

/// Damage counted ahead of the reader.
#[derive(Debug, Default)]
struct Counted {
    /// Damaged stretches counted in `corrupt_frames`: (segment seq, start offset).
    damage: BTreeSet<(u64, u64)>,
    /// Row ranges counted in `rows_lost`: start -> end, disjoint.
    rows: BTreeMap<u64, u64>,
}

impl Counted {
    /// Ranges overlapping [a, b), highest first.
    fn overlapping(&self, a: u64, b: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.rows
            .range(..b)
            .rev()
            .map(|(s, e)| (*s, *e))
            .take_while(move |(_, e)| *e > a)
    }

    /// Rows of [a, b) not counted yet.
    fn uncounted_rows(&self, a: u64, b: u64) -> u64 {
        let counted: u64 = self
            .overlapping(a, b)
            .map(|(s, e)| e.min(b) - s.max(a))
            .sum();
        (b - a).saturating_sub(counted)
    }

    /// Remembers [a, b) as counted; false when there is no room.
    fn remember_rows(&mut self, a: u64, b: u64) -> bool {
        let over: Vec<(u64, u64)> = self.overlapping(a, b).collect();
        if over.is_empty() && self.rows.len() >= DAMAGE_TRACKED_MAX {
            return false;
        }
        let (mut lo, mut hi) = (a, b);
        for (s, e) in over {
            self.rows.remove(&s);
            (lo, hi) = (lo.min(s), hi.max(e));
        }
        self.rows.insert(lo, hi);
        true
    }

    fn forget_rows_below(&mut self, seq: u64) {
        while self.rows.first_key_value().is_some_and(|(_, e)| *e <= seq) {
            self.rows.pop_first();
        }
    }

    fn forget_segment(&mut self, seg: u64) {
        let behind: Vec<(u64, u64)> = self
            .damage
            .range((seg, 0)..=(seg, u64::MAX))
            .copied()
            .collect();
        for k in behind {
            self.damage.remove(&k);
        }
    }
}

/// What `peek_many` returned, consumed together.
#[derive(Debug, Clone, Copy)]
struct Peeked {
    bytes: u64,
    /// Row sequence after the last frame (None for RWL1 frames).
    end_row_seq: Option<u64>,
}

impl Peeked {
    fn of(f: &FrameInfo) -> Peeked {
        Peeked {
            bytes: f.len,
            end_row_seq: f.end_row_seq(),
        }
    }
}

/// Failures a test injects into the writer (none outside tests: a zero-sized type).
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    #[cfg(test)]
    write_fails_after_bytes: Option<usize>,
    #[cfg(test)]
    cut_back_fails: bool,
    #[cfg(test)]
    sync_fails: bool,
    /// Bytes someone else appends (`O_APPEND`) between the writer's length check and its
    /// write.
    #[cfg(test)]
    append_before_write: Option<&'static [u8]>,
}

impl Faults {
    fn write_at(&self, f: &File, frame: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        if let Some(g) = self.append_before_write {
            // What O_APPEND does: at the end of the file, whatever the writer thinks it is.
            f.write_all_at(g, f.metadata()?.len())?;
        }
        #[cfg(test)]
        if let Some(n) = self.write_fails_after_bytes {
            f.write_all_at(&frame[..n.min(frame.len())], offset)?;
            return Err(io::Error::other("injected write failure"));
        }
        f.write_all_at(frame, offset)
    }

    fn cut_back(&self, f: &File, len: u64) -> io::Result<()> {
        #[cfg(test)]
        if self.cut_back_fails {
            return Err(io::Error::other("injected cut-back failure"));
        }
        f.set_len(len)
    }

    fn sync(&self, f: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.sync_fails {
            return Err(io::Error::other("injected sync failure"));
        }
        f.sync_data()
    }
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    bytes_max: u64,
    /// Oldest first; the last one is the one appended to.
    segments: VecDeque<Segment>,
    /// The live segment, open for appends; None when the next append starts a new one.
    tail: Option<File>,
    /// Read position in the oldest segment.
    read_offset: u64,
    /// The reader's place in the row sequence.
    read: Chain,
    /// Rows spooled before the next frame: its first row seq. Carried across segments, and
    /// across restarts from the last frame found at open.
    next_row_seq: u64,
    /// Damaged stretches found (torn or corrupt frames, foreign bytes).
    corrupt_frames: u64,
    /// Rows lost to damage.
    rows_lost: u64,
    counted: Counted,
    /// What `peek_many` returned, not yet consumed.
    peeked: Option<Peeked>,
    /// Appended since the last sync.
    unsynced_since: Option<Instant>,
    faults: Faults,
}

impl Spool {
    /// Opens (creating) the directory, finds the segments a previous run left and checks
    /// them: damage found now is counted now.
    pub fn open(dir: &Path, bytes_max: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut s = Spool {
            dir: dir.to_path_buf(),
            bytes_max,
            segments: list_segments(dir)?.into(),
            tail: None,
            read_offset: 0,
            read: Chain::default(),
            next_row_seq: 0,
            corrupt_frames: 0,
            rows_lost: 0,
            counted: Counted::default(),
            peeked: None,
            unsynced_since: None,
            faults: Faults::default(),
        };
        s.check_all()?;
        Ok(s)
    }

    /// Bytes on disk not yet replayed (damaged stretches included until the reader passes
    /// them).
    pub fn bytes(&self) -> u64 {
        let front = self
            .segments
            .front()
            .map_or(0, |s| s.len.min(self.read_offset));
        self.used_bytes() - front
    }

    fn used_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    /// Damaged stretches found so far (torn or corrupt frames, bytes the spool did not write).
    pub fn corrupt_frames(&self) -> u64 {
        self.corrupt_frames
    }

    /// Rows lost to damage so far.
    pub fn rows_lost(&self) -> u64 {
        self.rows_lost
    }

    /// Walks every segment at open, counting the damage in them.
    fn check_all(&mut self) -> Result<(), SpoolError> {
        let mut chain = Chain::default();
        let mut i = 0;
        while i < self.segments.len() {
            // A name that says where the segment starts lets damage at its very start be
            // counted too.
            chain.seq = chain.seq.or(self.segments[i].start_row_seq);
            self.segments[i].start_row_seq = chain.seq;
            match self.walk(i, 0, chain, Pass::Ahead) {
                Ok(c) => chain = c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.segments.remove(i);
                    continue;
                }
                Err(e) => return Err(io_err(&self.segments[i].path)(e)),
            }
            i += 1;
        }
        // The next frame follows the last one found, whole or with a header that held.
        self.next_row_seq = chain.seq.max(chain.damaged_hi).unwrap_or(0);
        self.close_chain(chain, Pass::Ahead);
        if self.segments.is_empty() {
            self.read = Chain::at(Some(self.next_row_seq));
        }
        Ok(())
    }

    /// Walks segment `i` from `from` to its end; returns where the chain stands after it.
    fn walk(&mut self, i: usize, from: u64, mut chain: Chain, pass: Pass) -> io::Result<Chain> {
        let (seq, len) = (self.segments[i].seq, self.segments[i].len);
        let mut r = SegmentReader::open(&self.segments[i].path, len)?;
        self.segments[i].len = r.len();
        let mut off = from;
        while off < r.len() {
            match r.probe(off)? {
                Probe::Whole(f) => {
                    self.reach(&mut chain, f.first_row_seq, pass);
                    chain.seq = chain.seq.max(f.end_row_seq());
                    off += f.len;
                }
                _ => {
                    let d = r.damage_at(off)?;
                    self.pass_damage(seq, &mut chain, &d, pass);
                    off = d.end;
                }
            }
        }
        Ok(chain)
    }

    /// A whole frame starting at row `first`: rows between where `chain` stands and it are
    /// lost. An RWL1 frame (no row sequence) leaves the chain unknown.
    fn reach(&mut self, chain: &mut Chain, first: Option<u64>, pass: Pass) {
        let Some(first) = first else {
            *chain = Chain::default();
            return;
        };
        if let Some(at) = chain.seq
            && first > at
        {
            self.lose_rows(at, first, pass);
        }
        chain.seq = chain.seq.max(Some(first));
        chain.damaged_hi = None;
    }

    /// The end of the spool: rows spooled past where `chain` stands were lost.
    fn close_chain(&mut self, chain: Chain, pass: Pass) -> Chain {
        let end = chain.damaged_hi.unwrap_or(0).max(self.next_row_seq);
        if let Some(at) = chain.seq
            && end > at
        {
            self.lose_rows(at, end, pass);
        }
        Chain::at(chain.seq.map(|at| at.max(end)))
    }

    fn pass_damage(&mut self, seg: u64, chain: &mut Chain, d: &Damage, pass: Pass) {
        let key = (seg, d.start);
        let new = match pass {
            Pass::Ahead => {
                !self.counted.damage.contains(&key)
                    && self.counted.damage.len() < DAMAGE_TRACKED_MAX
                    && self.counted.damage.insert(key)
            }
            Pass::Read => !self.counted.damage.remove(&key),
        };
        chain.seq = chain.seq.or(d.lo);
        chain.damaged_hi = chain.damaged_hi.max(d.hi);
        if new {
            self.corrupt_frames += d.frames;
            tracing::error!(
                segment = seg,
                from = d.start,
                to = d.end,
                frames = d.frames,
                rows_countable = chain.seq.is_some(),
                "log spool damage: bytes skipped up to the next whole frame"
            );
        }
    }

    /// Rows [a, b) of the row sequence are lost: counts those not counted yet.
    fn lose_rows(&mut self, a: u64, b: u64, pass: Pass) {
        let n = self.counted.uncounted_rows(a, b);
        if n == 0 {
            return;
        }
        match pass {
            // No room to remember it: the reader counts it when it gets there.
            Pass::Ahead if !self.counted.remember_rows(a, b) => return,
            Pass::Ahead => {}
            Pass::Read => self.counted.forget_rows_below(b),
        }
        self.rows_lost += n;
        tracing::error!(
            rows = n,
            from_row = a,
            to_row = b,
            "log rows lost to spool damage"
        );
    }

    /// Appends a batch, or refuses it when the quota would be exceeded.
    pub fn append(&mut self, b: &Batch) -> Result<(), SpoolError> {
        self.check_tail();
        let (frame_len, body_len) = frame::frame_bytes(b);
        let used = self.used_bytes();
        if used + frame_len as u64 > self.bytes_max || body_len > FRAME_BYTES_MAX {
            return Err(SpoolError::Full {
                used,
                max: self.bytes_max,
            });
        }
        self.ensure_tail(frame_len as u64)?;
        self.write_frame(&frame::encode(b, self.next_row_seq))?;
        self.next_row_seq += u64::from(b.rows);
        let since = *self.unsynced_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= SYNC_INTERVAL
            && let Err(e) = self.sync()
        {
            // The frame is spooled (the page cache has it, the reader finds it): not a failed
            // append. What the disk kept is for the reader to check.
            tracing::error!(error = %e, "log spool sync failed; appends go to a new segment");
        }
        Ok(())
    }

    /// A live segment with room for `frame_len` more bytes, starting a new one if needed.
    fn ensure_tail(&mut self, frame_len: u64) -> Result<(), SpoolError> {
        let fits = self
            .segments
            .back()
            .is_some_and(|s| s.len + frame_len <= SEGMENT_BYTES_MAX);
        if self.tail.is_some() && fits {
            return Ok(());
        }
        self.close_tail();
        let seq = self.segments.back().map_or(1, |s| s.seq + 1);
        let path = self
            .dir
            .join(format!("spool-{seq:016}-{}.seg", self.next_row_seq));
        // Not O_APPEND: frames go at the writer's own offset, never after someone else's bytes.
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.tail = Some(f);
        self.segments.push_back(Segment {
            seq,
            path,
            len: 0,
            start_row_seq: Some(self.next_row_seq),
        });
        Ok(())
    }

    fn write_frame(&mut self, frame: &[u8]) -> Result<(), SpoolError> {
        let (Some(f), Some(seg)) = (self.tail.as_ref(), self.segments.back_mut()) else {
            return Err(SpoolError::Io {
                path: self.dir.display().to_string(),
                source: io::Error::other("no live segment"),
            });
        };
        if let Err(e) = self.faults.write_at(f, frame, seg.len) {
            // Leave no partial frame: cut back to the last whole one and go on appending
            // there. If even that fails, this file takes nothing more.
            if let Err(cut) = self.faults.cut_back(f, seg.len) {
                tracing::error!(error = %cut, segment = %seg.path.display(), "log spool: cannot cut a failed append back; appends go to a new segment");
                self.tail = None;
            }
            return Err(io_err(&seg.path)(e));
        }
        seg.len += frame.len() as u64;
        Ok(())
    }

    /// Notices bytes in the live segment this writer did not write (appended or cut by
    /// someone else): the segment is closed at its real length and checked now, and appends
    /// go to a new one.
    fn check_tail(&mut self) {
        let (Some(f), Some(seg)) = (self.tail.as_ref(), self.segments.back()) else {
            return;
        };
        let found = match f.metadata() {
            // Removed by someone else: the reader counts its rows when it finds it gone.
            Ok(m) if m.nlink() == 0 => {
                tracing::error!(segment = %seg.path.display(), "log spool: the live segment was removed; appends go to a new segment");
                self.close_tail();
                return;
            }
            Ok(m) => m.len(),
            Err(e) => {
                tracing::error!(error = %e, segment = %seg.path.display(), "log spool: cannot stat the live segment; appends go to a new segment");
                self.close_tail();
                return;
            }
        };
        let written = seg.len;
        if found == written {
            return;
        }
        tracing::error!(segment = %seg.path.display(), written, found, "log spool: the live segment changed under the writer; closed and checked, appends go to a new segment");
        self.close_tail();
        let i = self.segments.len() - 1;
        self.segments[i].len = found;
        // Bytes added after ours: check them alone. Bytes cut: check what is left to read.
        let (from, chain) = if found > written {
            (written, Chain::at(Some(self.next_row_seq)))
        } else {
            self.unread(i)
        };
        match self.walk(i, from, chain, Pass::Ahead) {
            Ok(chain) => {
                self.close_chain(chain, Pass::Ahead);
            }
            Err(e) => tracing::error!(error = %e, "log spool: checking the live segment failed"),
        }
    }

    /// Where what is left to read of segment `i` starts, and the chain there.
    fn unread(&self, i: usize) -> (u64, Chain) {
        let start = self.segments[i].start_row_seq;
        match (i, self.read_offset) {
            (0, 0) => (0, Chain::at(self.read.seq.or(start))),
            (0, at) => (at, self.read),
            _ => (0, Chain::at(start)),
        }
    }

    /// Stops appending to the live segment (synced first, best effort).
    fn close_tail(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "log spool sync failed");
        }
        self.tail = None;
    }

    /// The writer's periodic call: notices outside changes to the live segment, and syncs
    /// appends that have waited `SYNC_INTERVAL`.
    pub fn tick(&mut self) -> Result<(), SpoolError> {
        self.check_tail();
        self.sync_if_due()
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
        if self.unsynced_since.take().is_none() {
            return Ok(());
        }
        let (Some(f), Some(seg)) = (self.tail.as_ref(), self.segments.back()) else {
            return Ok(());
        };
        if let Err(e) = self.faults.sync(f) {
            // After a failed fdatasync what the file holds is unknown (the kernel may drop
            // pages it could not write): nothing more goes after it.
            let e = io_err(&seg.path)(e);
            self.tail = None;
            return Err(e);
        }
        Ok(())
    }

    /// Up to `max_batches` of the oldest batches (from one segment, at most `max_bytes` of
    /// rows beyond the first, with no damage or missing rows between them), in order;
    /// `consume` then removes them.
    pub fn peek_many(
        &mut self,
        max_batches: usize,
        max_bytes: usize,
    ) -> Result<Vec<Batch>, SpoolError> {
        self.peeked = None;
        let Some((first, info, mut r)) = self.peek_first()? else {
            return Ok(Vec::new());
        };
        let mut peeked = Peeked::of(&info);
        let mut bytes = first.data.len();
        let mut out = vec![first];
        let mut off = self.read_offset + info.len;
        let path = self
            .segments
            .front()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        while out.len() < max_batches && off < r.len() {
            // Damage, and rows missing before a frame, are for the next peek to account for.
            let Probe::Whole(f) = r.probe(off).map_err(io_err(&path))? else {
                break;
            };
            if f.first_row_seq != peeked.end_row_seq {
                break;
            }
            let Some(b) = r.batch(&f).map_err(io_err(&path))? else {
                break;
            };
            if bytes + b.data.len() > max_bytes {
                break;
            }
            bytes += b.data.len();
            peeked.bytes += f.len;
            peeked.end_row_seq = f.end_row_seq();
            off += f.len;
            out.push(b);
        }
        self.peeked = Some(peeked);
        Ok(out)
    }

    /// The oldest batch not yet consumed. Damage before it is skipped and counted.
    pub fn peek(&mut self) -> Result<Option<Batch>, SpoolError> {
        self.peeked = None;
        let Some((b, f, _)) = self.peek_first()? else {
            return Ok(None);
        };
        self.peeked = Some(Peeked::of(&f));
        Ok(Some(b))
    }

    /// The first whole frame at or after the read position, with its batch and a reader
    /// of its segment.
    fn peek_first(&mut self) -> Result<Option<(Batch, FrameInfo, SegmentReader)>, SpoolError> {
        self.check_tail();
        loop {
            let Some(seg) = self.segments.front() else {
                self.read = self.close_chain(self.read, Pass::Read);
                return Ok(None);
            };
            if self.read_offset >= seg.len {
                if self.segments.len() == 1 {
                    self.read = self.close_chain(self.read, Pass::Read);
                    if self.tail.is_some() {
                        // The live segment is fully read: nothing pending.
                        return Ok(None);
                    }
                }
                self.drop_front()?;
                continue;
            }
            let path = seg.path.clone();
            let mut r = match SegmentReader::open(&path, seg.len) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Removed by someone else: its rows show as missing at the next frame.
                    tracing::error!(segment = %path.display(), "log spool segment vanished");
                    self.forget_front();
                    continue;
                }
                Err(e) => return Err(io_err(&path)(e)),
            };
            if let Some((b, f)) = self.read_at(&mut r).map_err(io_err(&path))? {
                return Ok(Some((b, f, r)));
            }
        }
    }

    /// At the read position: a whole frame (the rows before it accounted for), or damage,
    /// which is skipped and counted (None).
    fn read_at(&mut self, r: &mut SegmentReader) -> io::Result<Option<(Batch, FrameInfo)>> {
        let Some(seg) = self.segments.front_mut() else {
            return Ok(None);
        };
        // Cut by someone else since the spool last looked: the segment is what is left.
        seg.len = seg.len.min(r.len());
        let seq = seg.seq;
        if self.read_offset == 0 {
            self.read.seq = self.read.seq.or(seg.start_row_seq);
        }
        if self.read_offset >= r.len() {
            return Ok(None);
        }
        let mut chain = self.read;
        if let Probe::Whole(f) = r.probe(self.read_offset)?
            && let Some(b) = r.batch(&f)?
        {
            self.reach(&mut chain, f.first_row_seq, Pass::Read);
            self.read = chain;
            return Ok(Some((b, f)));
        }
        let d = r.damage_at(self.read_offset)?;
        self.pass_damage(seq, &mut chain, &d, Pass::Read);
        self.read = chain;
        self.read_offset = d.end;
        if self.segments.len() == 1 {
            // Never append after bytes that do not check out.
            self.close_tail();
        }
        Ok(None)
    }

    /// Marks the batches `peek` or `peek_many` returned as written.
    pub fn consume(&mut self) -> Result<(), SpoolError> {
        let p = match self.peeked.take() {
            Some(p) => p,
            None => match self.peek_first()? {
                Some((_, f, _)) => Peeked::of(&f),
                None => return Ok(()),
            },
        };
        self.read_offset += p.bytes;
        if let Some(end) = p.end_row_seq {
            self.read.seq = self.read.seq.max(Some(end));
            self.counted.forget_rows_below(end);
        }
        // Bytes someone else appended to the live segment while the batches were out are
        // found (and counted) before the segment is deleted as fully read.
        self.check_tail();
        let Some(seg) = self.segments.front() else {
            return Ok(());
        };
        if self.read_offset >= seg.len {
            if self.segments.len() == 1 {
                // Everything is replayed: start over with an empty directory.
                self.close_tail();
            }
            self.drop_front()?;
        }
        Ok(())
    }

    /// Deletes the oldest segment (fully read).
    fn drop_front(&mut self) -> Result<(), SpoolError> {
        let Some(seg) = self.forget_front() else {
            return Ok(());
        };
        match std::fs::remove_file(&seg.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&seg.path)(e)),
            _ => Ok(()),
        }
    }

    /// Takes the oldest segment off the list, leaving its file.
    fn forget_front(&mut self) -> Option<Segment> {
        self.peeked = None;
        let seg = self.segments.pop_front()?;
        if self.read_offset == 0 {
            // Never read (it vanished): where it started is where the reader stands.
            self.read.seq = self.read.seq.or(seg.start_row_seq);
        }
        self.read_offset = 0;
        if self.segments.is_empty() {
            // It was the live one too.
            self.tail = None;
        }
        self.counted.forget_segment(seg.seq);
        Some(seg)
    }
}

/// The segment files in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, SpoolError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some((seq, start_row_seq)) = name.to_str().and_then(parse_segment_name) else {
            continue;
        };
        let len = entry.metadata().map_err(io_err(dir))?.len();
        segments.push(Segment {
            seq,
            path: entry.path(),
            len,
            start_row_seq,
        });
    }
    segments.sort_by_key(|s| s.seq);
    Ok(segments)
}

/// `spool-<seq>-<first row>.seg`, or `spool-<seq>.seg` (earlier versions).
fn parse_segment_name(name: &str) -> Option<(u64, Option<u64>)> {
    let stem = name.strip_prefix("spool-")?.strip_suffix(".seg")?;
    match stem.split_once('-') {
        Some((seq, row)) => Some((seq.parse().ok()?, Some(row.parse().ok()?))),
        None => Some((stem.parse().ok()?, None)),
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn batch(i: u32) -> Batch {
        Batch {
            id: format!("b{i}"),
            rows: i,
            data: vec![i as u8; 100 + i as usize],
        }
    }

    fn frame_len(i: u32) -> u64 {
        frame::frame_bytes(&batch(i)).0 as u64
    }

    /// Replays everything (two batches per peek, as the writer groups them); the row counts
    /// of the batches, in order.
    fn drain(s: &mut Spool) -> Vec<u32> {
        let mut seen = Vec::new();
        loop {
            let some = s.peek_many(2, 1 << 20).unwrap();
            if some.is_empty() {
                return seen;
            }
            for b in &some {
                assert_eq!(*b, batch(b.rows), "a replayed batch is the one spooled");
            }
            seen.extend(some.iter().map(|b| b.rows));
            s.consume().unwrap();
        }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    fn append_all(s: &mut Spool, rows: impl IntoIterator<Item = u32>) {
        for i in rows {
            s.append(&batch(i)).unwrap();
        }
    }

    fn flip(path: &Path, offset: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], offset).unwrap();
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
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (0, 0));
    }

    #[test]
    fn quota_refuses_what_would_pass_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 400).unwrap();
        s.append(&batch(1)).unwrap();
        s.append(&batch(2)).unwrap();
        assert!(matches!(
            s.append(&batch(200)),
            Err(SpoolError::Full { .. })
        ));
        assert_eq!(s.bytes(), frame_len(1) + frame_len(2));
        assert_eq!(drain(&mut s), [1, 2]);
    }

    #[test]
    fn a_torn_last_frame_costs_its_rows_counted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=5);
        drop(s);
        // A crash mid-append: the last frame's header made it, not all of its body.
        let seg = segment_files(dir.path()).remove(0);
        let len = std::fs::metadata(&seg).unwrap().len();
        File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        // Counted when found, before any replay.
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 5));
        assert_eq!(drain(&mut s), [1, 2, 3, 4]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 5), "not twice");
        // The row sequence goes on after the torn frame.
        s.append(&batch(6)).unwrap();
        assert_eq!(drain(&mut s), [6]);
        assert_eq!(s.rows_lost(), 5);
    }

    #[test]
    fn a_torn_header_at_the_end_is_counted_as_a_frame_of_unknown_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=5);
        drop(s);
        // Not even the header of the last frame: nothing says how many rows it held.
        let seg = segment_files(dir.path()).remove(0);
        let keep = (1..=4).map(frame_len).sum::<u64>() + 10;
        File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        assert_eq!(drain(&mut s), [1, 2, 3, 4]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
    }

    /// Which of frames 1..=6 holds byte `offset` of their segment.
    fn frame_at(offset: u64) -> u32 {
        let mut end = 0;
        for i in 1..=6 {
            end += frame_len(i);
            if offset < end {
                return i;
            }
        }
        panic!("offset {offset} past the frames");
    }

    #[test]
    fn a_flipped_byte_anywhere_costs_only_its_frame() {
        let base = tempfile::tempdir().unwrap();
        let mut s = Spool::open(base.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=6);
        drop(s);
        let original = segment_files(base.path()).remove(0);
        let name = original.file_name().unwrap().to_owned();
        let len = std::fs::metadata(&original).unwrap().len();
        let last_head = len - frame_len(6)..len - frame_len(6) + frame::HEAD_V2_BYTES as u64;
        for offset in 0..len {
            let hit = frame_at(offset);
            let want: Vec<u32> = (1..=6).filter(|i| *i != hit).collect();
            // Found at open.
            let dir = tempfile::tempdir().unwrap();
            let seg = dir.path().join(&name);
            std::fs::copy(&original, &seg).unwrap();
            flip(&seg, offset);
            let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
            // The one case that cannot be sized at open: the header of the newest frame.
            let rows = if last_head.contains(&offset) { 0 } else { hit };
            let counts = (s.corrupt_frames(), s.rows_lost());
            assert_eq!(counts, (1, u64::from(rows)), "at open, byte {offset}");
            assert_eq!(drain(&mut s), want, "byte {offset}");
            assert_eq!((s.corrupt_frames(), s.rows_lost()), counts, "byte {offset}");
            // Found by the reader of a running spool, which knows where the rows end.
            let dir = tempfile::tempdir().unwrap();
            let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
            append_all(&mut s, 1..=6);
            flip(&segment_files(dir.path())[0], offset);
            assert_eq!(drain(&mut s), want, "running, byte {offset}");
            let counts = (s.corrupt_frames(), s.rows_lost());
            assert_eq!(counts, (1, u64::from(hit)), "running, byte {offset}");
        }
    }

    #[test]
    fn garbage_appended_to_the_live_segment_costs_no_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=5);
        let live = segment_files(dir.path()).remove(0);
        let mut f = OpenOptions::new().append(true).open(&live).unwrap();
        f.write_all(b"RWL2 not a frame, RWL1 neither, \x32\x4c\x57\x52 nor this")
            .unwrap();
        // The writer notices at its next look, before anything is appended after the garbage.
        s.tick().unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        append_all(&mut s, 6..=8);
        assert_eq!(
            segment_files(dir.path()).len(),
            2,
            "appends went to a new segment"
        );
        // The same when the append is the first to look.
        let live = segment_files(dir.path()).remove(1);
        OpenOptions::new()
            .append(true)
            .open(&live)
            .unwrap()
            .write_all(&[0xee; 300])
            .unwrap();
        append_all(&mut s, 9..=10);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (2, 0));
        assert_eq!(drain(&mut s), (1..=10).collect::<Vec<_>>());
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (2, 0), "not twice");
        assert!(s.is_empty());
    }

    #[test]
    fn garbage_appended_between_the_length_check_and_the_write_costs_no_rows() {
        // Longer than a frame: the frame lands over its start, the rest follows the frame.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=3);
        s.faults.append_before_write = Some(&[0x5a; 2000]);
        s.append(&batch(4)).unwrap();
        s.faults = Faults::default();
        let live = segment_files(dir.path()).remove(0);
        let ours = (1..=4).map(frame_len).sum::<u64>();
        let garbage_end = (1..=3).map(frame_len).sum::<u64>() + 2000;
        assert_eq!(std::fs::metadata(&live).unwrap().len(), garbage_end);
        // Noticed at the next append, which goes to a new segment.
        append_all(&mut s, 5..=6);
        assert_eq!(segment_files(dir.path()).len(), 2);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        assert_eq!(
            s.bytes(),
            garbage_end + frame_len(5) + frame_len(6),
            "the garbage after our frame waits to be skipped"
        );
        assert!(garbage_end > ours);
        assert_eq!(drain(&mut s), (1..=6).collect::<Vec<_>>());
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0), "not twice");
        assert!(s.is_empty());
        assert_eq!(segment_files(dir.path()), Vec::<PathBuf>::new());

        // Shorter than the frame: the frame covers all of it; nothing to skip or count.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=3);
        s.faults.append_before_write = Some(&[0x5a; 50]);
        s.append(&batch(4)).unwrap();
        s.faults = Faults::default();
        s.tick().unwrap();
        append_all(&mut s, 5..=6);
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(drain(&mut s), (1..=6).collect::<Vec<_>>());
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (0, 0));
        assert!(s.is_empty());
    }

    #[test]
    fn garbage_appended_while_frames_are_peeked_costs_no_rows() {
        // Behind the last frame, while the replay of the whole live segment is out.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=4);
        let some = s.peek_many(10, 1 << 20).unwrap();
        assert_eq!(some.len(), 4);
        let live = segment_files(dir.path()).remove(0);
        OpenOptions::new()
            .append(true)
            .open(&live)
            .unwrap()
            .write_all(&[0x5a; 3000])
            .unwrap();
        s.consume().unwrap();
        // Found (the segment is checked before it is deleted as read), counted once.
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        append_all(&mut s, 5..=6);
        assert_eq!(drain(&mut s), [5, 6]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        assert!(s.is_empty());
        assert_eq!(segment_files(dir.path()), Vec::<PathBuf>::new());

        // With frames behind the peeked ones, and appends while the peeked ones are out.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=4);
        assert_eq!(s.peek_many(2, 1 << 20).unwrap().len(), 2);
        let live = segment_files(dir.path()).remove(0);
        OpenOptions::new()
            .append(true)
            .open(&live)
            .unwrap()
            .write_all(&[0x5a; 3000])
            .unwrap();
        append_all(&mut s, 5..=5);
        s.consume().unwrap();
        append_all(&mut s, 6..=6);
        assert_eq!(drain(&mut s), [3, 4, 5, 6]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        assert!(s.is_empty());
        assert_eq!(segment_files(dir.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_live_segment_cut_from_outside_costs_the_rows_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=5);
        let live = segment_files(dir.path()).remove(0);
        // Cut in the middle of frame 4: frames 4 and 5 are gone.
        let cut = (1..=3).map(frame_len).sum::<u64>() + 40;
        File::options()
            .write(true)
            .open(&live)
            .unwrap()
            .set_len(cut)
            .unwrap();
        s.append(&batch(6)).unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 4 + 5));
        assert_eq!(s.bytes(), cut + frame_len(6));
        assert_eq!(drain(&mut s), [1, 2, 3, 6]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 9));
    }

    #[test]
    fn a_failed_append_is_cut_back_and_the_segment_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=3);
        s.faults.write_fails_after_bytes = Some(40);
        assert!(matches!(s.append(&batch(4)), Err(SpoolError::Io { .. })));
        let files = segment_files(dir.path());
        let whole = (1..=3).map(frame_len).sum::<u64>();
        assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), whole);
        s.faults = Faults::default();
        append_all(&mut s, 5..=6);
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(drain(&mut s), [1, 2, 3, 5, 6]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (0, 0));
    }

    #[test]
    fn a_failed_append_that_cannot_be_cut_back_ends_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=3);
        s.faults.write_fails_after_bytes = Some(40);
        s.faults.cut_back_fails = true;
        assert!(s.append(&batch(4)).is_err());
        s.faults = Faults::default();
        append_all(&mut s, 5..=6);
        assert_eq!(
            segment_files(dir.path()).len(),
            2,
            "nothing after the partial frame"
        );
        assert_eq!(
            s.bytes(),
            [1, 2, 3, 5, 6].map(frame_len).iter().sum::<u64>()
        );
        drop(s);
        // The partial frame is found at open; the rows it would have held were never spooled
        // (the caller counted them as a failed write), so none are lost to damage.
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        assert_eq!(drain(&mut s), [1, 2, 3, 5, 6]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
    }

    #[test]
    fn a_failed_sync_ends_the_segment_and_keeps_its_frames() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=2);
        s.faults.sync_fails = true;
        assert!(s.sync().is_err());
        s.faults = Faults::default();
        append_all(&mut s, 3..=4);
        assert_eq!(segment_files(dir.path()).len(), 2);
        assert_eq!(drain(&mut s), [1, 2, 3, 4]);
    }

    #[test]
    fn a_vanished_segment_counts_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        // Each open starts a new segment at the first append.
        for rows in [1..=2, 3..=4, 5..=6] {
            let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
            append_all(&mut s, rows);
        }
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 3);
        // Removed while running: found by the reader.
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        std::fs::remove_file(&files[1]).unwrap();
        assert_eq!(drain(&mut s), [1, 2, 5, 6]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (0, 3 + 4));
    }

    #[test]
    fn a_live_segment_removed_from_outside_counts_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        append_all(&mut s, 1..=3);
        std::fs::remove_file(segment_files(dir.path()).remove(0)).unwrap();
        append_all(&mut s, 4..=5);
        assert_eq!(
            segment_files(dir.path()).len(),
            1,
            "appends went to a new file"
        );
        assert_eq!(drain(&mut s), [4, 5]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (0, 1 + 2 + 3));
        // The same with nothing appended after it.
        append_all(&mut s, 6..=7);
        std::fs::remove_file(segment_files(dir.path()).remove(0)).unwrap();
        assert_eq!(drain(&mut s), Vec::<u32>::new());
        assert_eq!(s.rows_lost(), 6 + 6 + 7);
        assert!(s.is_empty());
        append_all(&mut s, 8..=8);
        assert_eq!(drain(&mut s), [8]);
    }

    #[test]
    fn damage_at_the_start_of_a_later_segment_is_counted_from_its_name() {
        let dir = tempfile::tempdir().unwrap();
        for rows in [1..=2, 3..=4] {
            let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
            append_all(&mut s, rows);
        }
        let files = segment_files(dir.path());
        // The first frame of each segment loses its header.
        flip(&files[0], 2);
        flip(&files[1], 2);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (2, 1 + 3));
        assert_eq!(drain(&mut s), [2, 4]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (2, 4));
    }

    /// A frame as versions before RWL2 wrote it.
    fn rwl1_frame(b: &Batch) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(b.id.len() as u16).to_le_bytes());
        body.extend_from_slice(b.id.as_bytes());
        body.extend_from_slice(&b.rows.to_le_bytes());
        body.extend_from_slice(&b.data);
        let mut f = 0x5257_4c31u32.to_le_bytes().to_vec();
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&crc32(&body).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn rwl1_segments_of_an_earlier_version_replay_and_resync() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        for i in 1..=3 {
            old.extend_from_slice(&rwl1_frame(&batch(i)));
        }
        // Frame 2 damaged: RWL1 resynchronises too, but cannot say how many rows it held.
        let in_frame_2 = rwl1_frame(&batch(1)).len() + 30;
        old[in_frame_2] ^= 0xff;
        std::fs::write(dir.path().join("spool-0000000000000001.seg"), &old).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        append_all(&mut s, 7..=8);
        assert_eq!(drain(&mut s), [1, 3, 7, 8]);
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (1, 0));
        assert!(s.is_empty());
    }

    /// A tmpfs of `bytes` mounted on a new directory, unmounted when dropped; None (with a
    /// note) where mounting is not permitted.
    struct SmallDisk {
        dir: tempfile::TempDir,
    }

    impl SmallDisk {
        fn mount(bytes: u64) -> Option<SmallDisk> {
            let dir = tempfile::tempdir().ok()?;
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(dir.path())
                .output();
            match out {
                Ok(o) if o.status.success() => Some(SmallDisk { dir }),
                Ok(o) => {
                    let why = String::from_utf8_lossy(&o.stderr).into_owned();
                    eprintln!("skipped: cannot mount a tmpfs (needs root): {why}");
                    None
                }
                Err(e) => {
                    eprintln!("skipped: cannot run mount: {e}");
                    None
                }
            }
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_drops_only_the_appends_that_failed() {
        let Some(disk) = SmallDisk::mount(64 << 10) else {
            return;
        };
        let mut s = Spool::open(disk.dir.path(), 1 << 30).unwrap();
        let big = |i: u32| Batch {
            id: format!("big{i}"),
            rows: i,
            data: vec![7; 3000],
        };
        let (mut spooled, mut failed) = (Vec::new(), 0);
        for i in 1..=40 {
            match s.append(&big(i)) {
                Ok(()) => spooled.push(i),
                Err(SpoolError::Io { .. }) => failed += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            failed > 0 && spooled.len() > 5,
            "{spooled:?}, {failed} failed"
        );
        // Every failed append was cut back: the files hold whole frames only.
        let on_disk: u64 = segment_files(disk.dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        let whole: u64 = spooled
            .iter()
            .map(|i| frame::frame_bytes(&big(*i)).0 as u64)
            .sum();
        assert_eq!(on_disk, whole);
        assert_eq!(s.bytes(), whole);
        drop(s);
        let mut s = Spool::open(disk.dir.path(), 1 << 30).unwrap();
        assert_eq!((s.corrupt_frames(), s.rows_lost()), (0, 0));
        let mut seen = Vec::new();
        while let Some(b) = s.peek().unwrap() {
            assert_eq!(b, big(b.rows));
            seen.push(b.rows);
            s.consume().unwrap();
        }
        assert_eq!(seen, spooled);
        // Replayed segments are deleted: room again.
        s.append(&big(99)).unwrap();
    }
}
