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

#[derive(Debug)]
struct Entry {
    due_tick: u64,
    generation: u32,
    armed: bool,
    fired: bool,
    waker: Option<Waker>,
}

/// The wheel. Single-threaded: it lives in the worker.
#[derive(Debug)]
pub struct Deadlines {
    start: Instant,
    /// Last tick processed.
    cursor: Cell<u64>,
    entries: RefCell<Vec<Entry>>,
    free: RefCell<Vec<u32>>,
    wheel: RefCell<Vec<Vec<(u32, u32)>>>,
    far: RefCell<Vec<(u32, u32)>>,
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
            entries: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            wheel: RefCell::new((0..WHEEL_SLOTS).map(|_| Vec::new()).collect()),
            far: RefCell::new(Vec::new()),
        }
    }

    fn tick_of(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.start);
        // Round up: never fire before the deadline.
        d.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// A future that resolves once `deadline` has passed (at the next tick after it).
    pub fn at(&self, deadline: Instant) -> Deadline<'_> {
        let due_tick = self.tick_of(deadline).max(self.cursor.get() + 1);
        let mut entries = self.entries.borrow_mut();
        let key = match self.free.borrow_mut().pop() {
            Some(k) => {
                let e = &mut entries[k as usize];
                e.generation = e.generation.wrapping_add(1);
                e.due_tick = due_tick;
                e.armed = true;
                e.fired = false;
                e.waker = None;
                k
            }
            None => {
                entries.push(Entry {
                    due_tick,
                    generation: 0,
                    armed: true,
                    fired: false,
                    waker: None,
                });
                (entries.len() - 1) as u32
            }
        };
        let generation = entries[key as usize].generation;
        drop(entries);
        self.place(key, generation, due_tick);
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

    fn place(&self, key: u32, generation: u32, due_tick: u64) {
        if due_tick - self.cursor.get() < WHEEL_SLOTS as u64 {
            self.wheel.borrow_mut()[(due_tick % WHEEL_SLOTS as u64) as usize]
                .push((key, generation));
        } else {
            self.far.borrow_mut().push((key, generation));
        }
    }

    /// Processes every tick up to `now`, waking expired waiters. Called by the housekeeping
    /// task every `TICK`.
    pub fn advance(&self, now: Instant) {
        let target = now.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos();
        let target = target as u64;
        // After a long stall, do not walk more than one turn tick by tick.
        if target > self.cursor.get() + WHEEL_SLOTS as u64 {
            self.cursor.set(target - WHEEL_SLOTS as u64);
        }
        while self.cursor.get() < target {
            let t = self.cursor.get() + 1;
            self.cursor.set(t);
            let slot = (t % WHEEL_SLOTS as u64) as usize;
            let due = std::mem::take(&mut self.wheel.borrow_mut()[slot]);
            let mut keep = Vec::new();
            for (key, generation) in due {
                let mut entries = self.entries.borrow_mut();
                let Some(e) = entries.get_mut(key as usize) else {
                    continue;
                };
                if e.generation != generation || !e.armed {
                    continue;
                }
                if e.due_tick <= t {
                    e.fired = true;
                    if let Some(w) = e.waker.take() {
                        drop(entries);
                        w.wake();
                    }
                } else {
                    keep.push((key, generation));
                }
            }
            if !keep.is_empty() {
                let mut wheel = self.wheel.borrow_mut();
                // Left over from a skipped stall: still due later in this turn or beyond.
                for k in keep {
                    wheel[slot].push(k);
                }
            }
            if t.is_multiple_of(WHEEL_SLOTS as u64) {
                self.refile_far();
            }
        }
    }

    /// Moves far deadlines that are now within one turn into the wheel.
    fn refile_far(&self) {
        let far = std::mem::take(&mut *self.far.borrow_mut());
        for (key, generation) in far {
            let due = {
                let entries = self.entries.borrow();
                match entries.get(key as usize) {
                    Some(e) if e.generation == generation && e.armed => e.due_tick,
                    _ => continue,
                }
            };
            self.place(key, generation, due.max(self.cursor.get() + 1));
        }
    }

    /// Fires every armed deadline now (shutdown).
    pub fn fire_all(&self) {
        let mut wakers = Vec::new();
        for e in self.entries.borrow_mut().iter_mut() {
            if e.armed && !e.fired {
                e.fired = true;
                if let Some(w) = e.waker.take() {
                    wakers.push(w);
                }
            }
        }
        for w in wakers {
            w.wake();
        }
    }

    /// Deadlines registered and not yet dropped.
    pub fn armed(&self) -> usize {
        self.entries.borrow().iter().filter(|e| e.armed).count()
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
        let mut entries = self.owner.entries.borrow_mut();
        let e = &mut entries[self.key as usize];
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
        let mut entries = self.owner.entries.borrow_mut();
        if let Some(e) = entries.get_mut(self.key as usize)
            && e.generation == self.generation
        {
            e.armed = false;
            e.waker = None;
            drop(entries);
            self.owner.free.borrow_mut().push(self.key);
        }
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
            dl.entries.borrow().len(),
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
}
