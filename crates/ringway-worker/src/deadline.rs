//! Coarse per-worker deadlines for waiting connections.
//!
//! An idle keep-alive connection needs a timeout, and a monoio `Sleep` is 640 bytes: more than
//! the whole budget of an idle connection (nginx holds about 0.75 KiB). Connections waiting for
//! their next request therefore register a deadline here instead: a slab entry and a slot in a
//! hashed wheel, about 40 bytes, resolved to `TICK`. The worker's housekeeping task advances
//! the wheel every tick and wakes the connections whose deadline passed. Exact timeouts inside
//! an exchange (upstream reads, writes) still use monoio timers: they are few at a time and
//! live in the per-request allocation.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Resolution of connection deadlines (and the housekeeping period that advances them).
pub const TICK: Duration = Duration::from_millis(25);
/// Wheel slots: deadlines up to `TICK * WHEEL_SLOTS` ahead go straight into a slot; later ones
/// wait in a far list that is re-sorted once per wheel turn.
const WHEEL_SLOTS: usize = 256;

/// End of a list.
const NIL: u32 = u32::MAX;
/// List index of the far list (after the wheel slots).
const FAR: u16 = WHEEL_SLOTS as u16;
/// `Entry::list` of an entry in no list (fired, or free).
const UNLINKED: u16 = u16::MAX;

#[derive(Debug)]
struct Entry {
    due_tick: u64,
    generation: u32,
    armed: bool,
    fired: bool,
    waker: Option<Waker>,
    /// Doubly linked through the slab: a slot (or the far list) is a list of entries, so a
    /// deadline dropped before it fires (the common case: data arrived) is unlinked at once and
    /// nothing accumulates per request. Free entries are chained through `next`.
    prev: u32,
    next: u32,
    list: u16,
}

#[derive(Debug)]
struct Inner {
    entries: Vec<Entry>,
    free_head: u32,
    /// Heads of the wheel slots, then of the far list.
    heads: [u32; WHEEL_SLOTS + 1],
    /// Wakers taken while the wheel is borrowed, woken after; kept for its capacity.
    wake_buf: Vec<Waker>,
}

impl Inner {
    fn link(&mut self, key: u32, list: u16) {
        let head = self.heads[list as usize];
        {
            let e = &mut self.entries[key as usize];
            e.prev = NIL;
            e.next = head;
            e.list = list;
        }
        if head != NIL {
            self.entries[head as usize].prev = key;
        }
        self.heads[list as usize] = key;
    }

    fn unlink(&mut self, key: u32) {
        let (prev, next, list) = {
            let e = &self.entries[key as usize];
            (e.prev, e.next, e.list)
        };
        if list == UNLINKED {
            return;
        }
        if prev == NIL {
            self.heads[list as usize] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[key as usize];
        e.prev = NIL;
        e.next = NIL;
        e.list = UNLINKED;
    }

    fn place(&mut self, key: u32, cursor: u64) {
        let due = self.entries[key as usize].due_tick.max(cursor + 1);
        let list = if due - cursor < WHEEL_SLOTS as u64 {
            (due % WHEEL_SLOTS as u64) as u16
        } else {
            FAR
        };
        self.link(key, list);
    }

    /// Fires `key` (already known armed and unfired): unlinks it and keeps its waker.
    fn fire(&mut self, key: u32, wakers: &mut Vec<Waker>) {
        self.unlink(key);
        let e = &mut self.entries[key as usize];
        e.fired = true;
        if let Some(w) = e.waker.take() {
            wakers.push(w);
        }
    }
}

/// The wheel. Single-threaded: it lives in the worker. Registering, dropping and firing a
/// deadline are O(1) and allocate nothing once the slab has grown to the most deadlines held
/// at once.
#[derive(Debug)]
pub struct Deadlines {
    start: Instant,
    /// Last tick processed.
    cursor: Cell<u64>,
    inner: RefCell<Inner>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Deadlines {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            cursor: Cell::new(0),
            inner: RefCell::new(Inner {
                entries: Vec::new(),
                free_head: NIL,
                heads: [NIL; WHEEL_SLOTS + 1],
                wake_buf: Vec::new(),
            }),
        }
    }

    fn tick_of(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.start);
        // Round up: never fire before the deadline.
        d.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// A future that resolves once `deadline` has passed (at the next tick after it).
    pub fn at(&self, deadline: Instant) -> Deadline<'_> {
        let cursor = self.cursor.get();
        let due_tick = self.tick_of(deadline).max(cursor + 1);
        let mut inner = self.inner.borrow_mut();
        let key = if inner.free_head != NIL {
            let k = inner.free_head;
            let e = &mut inner.entries[k as usize];
            let next_free = e.next;
            e.generation = e.generation.wrapping_add(1);
            e.due_tick = due_tick;
            e.armed = true;
            e.fired = false;
            e.waker = None;
            e.prev = NIL;
            e.next = NIL;
            e.list = UNLINKED;
            inner.free_head = next_free;
            k
        } else {
            assert!(inner.entries.len() < NIL as usize, "deadline slab full");
            inner.entries.push(Entry {
                due_tick,
                generation: 0,
                armed: true,
                fired: false,
                waker: None,
                prev: NIL,
                next: NIL,
                list: UNLINKED,
            });
            (inner.entries.len() - 1) as u32
        };
        inner.place(key, cursor);
        let generation = inner.entries[key as usize].generation;
        Deadline {
            owner: self,
            key,
            generation,
        }
    }

    /// A future that resolves after `d`.
    pub fn after(&self, d: Duration) -> Deadline<'_> {
        self.at(Instant::now() + d)
    }

    /// Processes every tick up to `now`, waking expired waiters. Called by the housekeeping
    /// task every `TICK`.
    pub fn advance(&self, now: Instant) {
        let target = now.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos();
        let target = target as u64;
        let mut inner = self.inner.borrow_mut();
        let mut wakers = std::mem::take(&mut inner.wake_buf);
        // After a long stall, do not walk more than one turn tick by tick: every slot is
        // visited once, and what was due in the skipped ticks is due now.
        if target > self.cursor.get() + WHEEL_SLOTS as u64 {
            self.cursor.set(target - WHEEL_SLOTS as u64);
        }
        while self.cursor.get() < target {
            let t = self.cursor.get() + 1;
            self.cursor.set(t);
            let slot = (t % WHEEL_SLOTS as u64) as usize;
            let mut key = inner.heads[slot];
            while key != NIL {
                let next = inner.entries[key as usize].next;
                // Everything in a visited slot is due (placement keeps deadlines within one
                // turn of the cursor); the check guards the invariant.
                if inner.entries[key as usize].due_tick <= t {
                    inner.fire(key, &mut wakers);
                }
                key = next;
            }
            if t.is_multiple_of(WHEEL_SLOTS as u64) {
                // Far deadlines now within one turn move into the wheel.
                let mut key = inner.heads[FAR as usize];
                while key != NIL {
                    let next = inner.entries[key as usize].next;
                    let due = inner.entries[key as usize].due_tick;
                    if due <= t || due - t < WHEEL_SLOTS as u64 {
                        inner.unlink(key);
                        inner.place(key, t);
                    }
                    key = next;
                }
            }
        }
        drop(inner);
        // Woken outside the borrow: a waker may run code that registers or drops deadlines.
        for w in wakers.drain(..) {
            w.wake();
        }
        self.inner.borrow_mut().wake_buf = wakers;
    }

    /// Fires every armed deadline now.
    #[cfg(test)]
    pub fn fire_all(&self) {
        let mut inner = self.inner.borrow_mut();
        let mut wakers = Vec::new();
        for key in 0..inner.entries.len() as u32 {
            let e = &inner.entries[key as usize];
            if e.armed && !e.fired {
                inner.fire(key, &mut wakers);
            }
        }
        drop(inner);
        for w in wakers {
            w.wake();
        }
    }

    /// Deadlines registered and not yet dropped.
    #[cfg(test)]
    pub fn armed(&self) -> usize {
        self.inner
            .borrow()
            .entries
            .iter()
            .filter(|e| e.armed)
            .count()
    }
}

/// A registered deadline; dropping it unregisters it.
#[derive(Debug)]
pub struct Deadline<'a> {
    owner: &'a Deadlines,
    key: u32,
    generation: u32,
}

impl Future for Deadline<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.owner.inner.borrow_mut();
        let e = &mut inner.entries[self.key as usize];
        debug_assert_eq!(e.generation, self.generation);
        if e.fired {
            return Poll::Ready(());
        }
        match &e.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => e.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Deadline<'_> {
    fn drop(&mut self) {
        let mut inner = self.owner.inner.borrow_mut();
        let key = self.key;
        let Some(e) = inner.entries.get(key as usize) else {
            return;
        };
        if e.generation != self.generation || !e.armed {
            return;
        }
        inner.unlink(key);
        let free_head = inner.free_head;
        let e = &mut inner.entries[key as usize];
        e.armed = false;
        // Dropped after the borrow ends (a waker's drop may run arbitrary code).
        let waker = e.waker.take();
        e.next = free_head;
        inner.free_head = key;
        drop(inner);
        drop(waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll(d: &mut Pin<Box<Deadline<'_>>>, cx: &mut Context<'_>) -> bool {
        d.as_mut().poll(cx).is_ready()
    }

    #[test]
    fn fires_at_tick_granularity_never_early() {
        let t0 = Instant::now();
        let dl = Deadlines::new(t0);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(dl.at(t0 + Duration::from_millis(60)));
        let mut far =
            Box::pin(dl.at(t0 + TICK * (WHEEL_SLOTS as u32 * 3) + Duration::from_millis(1)));
        let mut dropped = Box::pin(dl.at(t0 + Duration::from_millis(30)));
        assert!(!poll(&mut a, &mut cx) && !poll(&mut far, &mut cx) && !poll(&mut dropped, &mut cx));
        drop(dropped);
        dl.advance(t0 + Duration::from_millis(59));
        assert!(!poll(&mut a, &mut cx), "not before the deadline");
        dl.advance(t0 + Duration::from_millis(76));
        assert!(poll(&mut a, &mut cx));
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "dropped deadlines do not wake"
        );
        // The far deadline survives several wheel turns.
        let mut t = t0;
        while t < t0 + TICK * (WHEEL_SLOTS as u32 * 3) {
            t += TICK;
            dl.advance(t);
            assert!(!poll(&mut far, &mut cx));
        }
        dl.advance(t + TICK * 2);
        assert!(poll(&mut far, &mut cx));
    }

    #[test]
    fn slots_are_reused_and_fire_all_wakes_everyone() {
        let t0 = Instant::now();
        let dl = Deadlines::new(t0);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            let mut d = Box::pin(dl.after(Duration::from_secs(60)));
            assert!(!poll(&mut d, &mut cx));
        }
        assert_eq!(
            dl.inner.borrow().entries.len(),
            1,
            "one slot reused a thousand times"
        );
        let mut ds: Vec<_> = (0..10)
            .map(|_| Box::pin(dl.after(Duration::from_secs(60))))
            .collect();
        for d in ds.iter_mut() {
            assert!(!poll(d, &mut cx));
        }
        assert_eq!(dl.armed(), 10);
        dl.fire_all();
        assert_eq!(count.0.load(Ordering::Relaxed), 10);
        assert!(ds.iter_mut().all(|d| poll(d, &mut cx)));
    }

    #[test]
    fn dropping_from_the_middle_of_a_slot_keeps_the_rest() {
        let t0 = Instant::now();
        let dl = Deadlines::new(t0);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        // Ten deadlines in one slot and ten in the far list; drop every other one.
        let near = t0 + Duration::from_millis(40);
        let far = t0 + TICK * (WHEEL_SLOTS as u32 + 10);
        let mut ds: Vec<_> = (0..20)
            .map(|i| Box::pin(dl.at(if i < 10 { near } else { far })))
            .collect();
        for d in ds.iter_mut() {
            assert!(!poll(d, &mut cx));
        }
        let mut kept: Vec<_> = ds
            .into_iter()
            .enumerate()
            .filter_map(|(i, d)| (i % 2 == 0).then_some(d))
            .collect();
        assert_eq!(dl.armed(), 10);
        dl.advance(t0 + Duration::from_millis(50));
        assert_eq!(count.0.load(Ordering::Relaxed), 5);
        assert!(kept[..5].iter_mut().all(|d| poll(d, &mut cx)));
        let mut t = t0;
        while t < far + TICK * 2 {
            t += TICK;
            dl.advance(t);
        }
        assert_eq!(count.0.load(Ordering::Relaxed), 10);
        assert!(kept[5..].iter_mut().all(|d| poll(d, &mut cx)));
        drop(kept);
        assert_eq!(dl.armed(), 0);
        // Dropped and fired entries are reused: no growth past the most held at once.
        for _ in 0..100 {
            let a = dl.after(Duration::from_secs(1));
            let b = dl.after(Duration::from_secs(100));
            drop(a);
            drop(b);
        }
        assert_eq!(dl.inner.borrow().entries.len(), 20);
    }
}
