//! Worker-local wakeups (single thread, no atomics): the shutdown event every idle connection
//! waits on, and the accept loop's "a connection slot is free" signal.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// An event that fires once and wakes every waiter.
#[derive(Debug, Default)]
pub struct LocalEvent {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl LocalEvent {
    pub fn fire(&self) {
        if self.fired.replace(true) {
            return;
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        self.free.borrow_mut().clear();
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Resolves once the event has fired.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            event: self,
            slot: None,
        }
    }
}

/// Future returned by [`LocalEvent::wait`]; deregisters itself when dropped.
#[derive(Debug)]
pub struct Wait<'a> {
    event: &'a LocalEvent,
    slot: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let ev = self.event;
        if ev.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = ev.waiters.borrow_mut();
        match self.slot {
            Some(i) if i < waiters.len() => waiters[i] = Some(cx.waker().clone()),
            _ => {
                let i = match ev.free.borrow_mut().pop() {
                    Some(i) => {
                        waiters[i] = Some(cx.waker().clone());
                        i
                    }
                    None => {
                        waiters.push(Some(cx.waker().clone()));
                        waiters.len() - 1
                    }
                };
                drop(waiters);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot
            && !self.event.fired.get()
        {
            let mut waiters = self.event.waiters.borrow_mut();
            if let Some(w) = waiters.get_mut(i) {
                *w = None;
                self.event.free.borrow_mut().push(i);
            }
        }
    }
}

/// Wakes one waiting task (the accept loop) when signalled; signals with nobody waiting are
/// remembered until the next wait.
#[derive(Debug, Default)]
pub struct LocalSignal {
    pending: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalSignal {
    pub fn notify(&self) {
        self.pending.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
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

    #[test]
    fn fires_all_waiters_and_reuses_slots() {
        let ev = LocalEvent::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(ev.wait());
        let mut b = Box::pin(ev.wait());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        drop(b);
        let mut c = Box::pin(ev.wait());
        assert!(c.as_mut().poll(&mut cx).is_pending());
        assert_eq!(ev.waiters.borrow().len(), 2, "dropped slot reused");
        ev.fire();
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert!(a.as_mut().poll(&mut cx).is_ready());
        assert!(c.as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(ev.wait()).as_mut().poll(&mut cx).is_ready());
    }
}
