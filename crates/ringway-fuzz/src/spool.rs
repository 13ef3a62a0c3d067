//! The log spool's frame reader, against damage the input chooses: a segment is written by the
//! real writer, then bytes are flipped, cut off, inserted or appended, and the spool is
//! reopened and replayed. Every frame the damage left whole must come back, in order, as it
//! was written; nothing may come back that was never written; and the rows counted as lost
//! are never more than the damaged frames held, and exactly theirs where a whole frame follows
//! the damage (the row sequence then tells).

use crate::{Rng, seeded};
use ringway_control::pg::spool::{Batch, Spool};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Batches written per input, at most.
const BATCHES_MAX: u8 = 8;
/// Damage operations applied per input, at most.
const OPS_MAX: usize = 8;

#[derive(Debug, Clone, Copy)]
enum Op {
    Flip { at: usize, mask: u8 },
    Cut { at: usize },
    Insert { at: usize, len: usize },
    Append { len: usize },
}

fn ops(rest: &[u8], file_len: usize) -> Vec<Op> {
    rest.chunks_exact(3)
        .take(OPS_MAX)
        .map(|c| {
            let at = (usize::from(c[1]) << 8 | usize::from(c[2])) % file_len.max(1);
            match c[0] % 4 {
                0 => Op::Flip {
                    at,
                    mask: (c[0] >> 2) | 1,
                },
                1 => Op::Cut { at },
                2 => Op::Insert {
                    at,
                    len: 1 + usize::from(c[0] >> 2),
                },
                _ => Op::Append {
                    len: 1 + usize::from(c[0] >> 2),
                },
            }
        })
        .collect()
}

/// A scratch directory per run (removed at the end), on tmpfs where there is one: the spool
/// syncs its segments, and a disk sync per run would make a few runs a second.
fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!(
        "ringway-fuzz-spool-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Where each frame sits in the file: (start, end), in writing order.
type Spans = Vec<(usize, usize)>;

/// Applies `ops` to `file`, following where each frame's bytes go: None once damaged.
fn damage(
    file: &mut Vec<u8>,
    spans: &Spans,
    ops: &[Op],
    rng: &mut Rng,
) -> Vec<Option<(usize, usize)>> {
    let mut at: Vec<Option<(usize, usize)>> = spans.iter().map(|&s| Some(s)).collect();
    for &op in ops {
        match op {
            // Flips are judged at the end, by the bytes (two flips of one byte undo each other).
            Op::Flip { at: p, mask } if p < file.len() => file[p] ^= mask,
            Op::Cut { at: p } if p < file.len() => {
                file.truncate(p);
                for s in at.iter_mut() {
                    if s.is_some_and(|(_, b)| b > p) {
                        *s = None;
                    }
                }
            }
            Op::Insert { at: p, len } if p <= file.len() => {
                let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                file.splice(p..p, junk);
                for s in at.iter_mut() {
                    match *s {
                        Some((a, b)) if a < p && p < b => *s = None,
                        Some((a, b)) if a >= p => *s = Some((a + len, b + len)),
                        _ => {}
                    }
                }
            }
            Op::Append { len } => file.extend((0..len).map(|_| rng.next() as u8)),
            _ => {}
        }
    }
    at
}

pub(crate) fn frames(data: &[u8]) {
    let (seed, rest) = seeded(data);
    let mut rng = Rng::new(data);
    let n = 1 + seed % BATCHES_MAX;
    let dir = scratch();
    let batches: Vec<Batch> = (0..n)
        .map(|i| Batch {
            id: format!("b{i}"),
            rows: 1 + u32::from(i),
            data: (0..rng.size(200)).map(|_| rng.next() as u8).collect(),
        })
        .collect();
    // Written by the real writer; the spool's byte count after each append marks the frames.
    let mut spans = Vec::new();
    {
        let mut s = Spool::open(&dir, 1 << 30).expect("spool opens");
        let mut end = 0usize;
        for b in &batches {
            s.append(b).expect("append");
            let now = s.bytes() as usize;
            spans.push((end, now));
            end = now;
        }
    }
    let seg = std::fs::read_dir(&dir)
        .expect("spool dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("one segment");
    let mut file = std::fs::read(&seg).expect("segment");
    assert_eq!(file.len(), spans.last().map_or(0, |s| s.1));
    let ops = ops(rest, file.len());
    let original = file.clone();
    let mut whole = damage(&mut file, &spans, &ops, &mut rng);
    // A frame is whole where its bytes still stand, unchanged, in one piece. One whose bytes
    // reappear whole elsewhere (junk inserted after its first byte, ending in that same byte)
    // may come back too: it is neither required nor known lost.
    let mut maybe = vec![false; spans.len()];
    for (i, (w, &(a0, b0))) in whole.iter_mut().zip(&spans).enumerate() {
        if w.is_some_and(|(a, b)| file.get(a..b) != Some(&original[a0..b0])) {
            *w = None;
        }
        let frame = &original[a0..b0];
        maybe[i] = w.is_none() && file.windows(frame.len()).any(|x| x == frame);
    }
    std::fs::write(&seg, &file).expect("write back");

    let mut s = Spool::open(&dir, 1 << 30).expect("spool reopens");
    let mut back = Vec::new();
    while let Some(b) = s.peek().expect("peek") {
        back.push(b);
        s.consume().expect("consume");
        assert!(
            back.len() <= batches.len(),
            "more batches than were written"
        );
    }
    let kept: Vec<&Batch> = batches
        .iter()
        .zip(&whole)
        .filter(|(_, w)| w.is_some())
        .map(|(b, _)| b)
        .collect();
    // Whole frames all come back, in order; nothing comes back that was not written.
    let mut it = back.iter();
    for k in &kept {
        assert!(it.any(|b| b == *k), "whole frame {} lost", k.id);
    }
    for (i, b) in back.iter().enumerate() {
        assert!(batches.contains(b), "a batch nobody wrote: {}", b.id);
        assert!(!back[..i].contains(b), "batch {} came back twice", b.id);
    }
    // Rows counted lost: at most the damaged frames' rows; exactly those damaged before the
    // last whole frame (their gap in the row sequence shows).
    let damaged: u64 = batches
        .iter()
        .zip(&whole)
        .filter(|(_, w)| w.is_none())
        .map(|(b, _)| u64::from(b.rows))
        .sum();
    let last_whole = whole.iter().rposition(Option::is_some);
    let before_last: u64 = batches
        .iter()
        .zip(&whole)
        .zip(&maybe)
        .take(last_whole.map_or(0, |i| i + 1))
        .filter(|((_, w), m)| w.is_none() && !**m)
        .map(|((b, _), _)| u64::from(b.rows))
        .sum();
    let lost = s.rows_lost();

    assert!(
        lost <= damaged,
        "{lost} rows counted lost of {damaged} damaged"
    );
    assert!(
        lost >= before_last,
        "{lost} rows counted lost, {before_last} known lost"
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
