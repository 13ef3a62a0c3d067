//! The process-wide shutdown flag.
//!
//! Set once by the signal handler (or a test); workers poll it on a short timer, so nothing on
//! the request path waits on it and no cross-thread wakeup is needed.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Shutdown {
    requested: AtomicBool,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every worker to stop accepting, finish in-flight requests and exit.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}
