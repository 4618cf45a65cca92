//! The thread behind a spawned relay or bridge, and the handle that stops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::error::Result;

/// A relay or bridge running on its own thread, started by its `spawn`. Dropping the handle
/// stops the worker after its current step and joins the thread; work not yet done stays
/// where it was (the outbox, the broker) for the next worker.
#[derive(Debug)]
pub struct WorkerHandle<S> {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<S>>,
    thread: Option<JoinHandle<()>>,
}

impl<S: Clone> WorkerHandle<S> {
    /// Starts a thread named `name` that calls `step` until stopped.
    pub(crate) fn spawn(
        name: &str,
        stats: Arc<Mutex<S>>,
        mut step: impl FnMut() + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    step();
                }
            })?;
        Ok(WorkerHandle {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The worker's counters.
    pub fn stats(&self) -> S {
        self.stats.lock().clone()
    }
}

impl<S> WorkerHandle<S> {
    /// Stops the worker after its current step and waits for the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            // A panic in the worker has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}

impl<S> Drop for WorkerHandle<S> {
    fn drop(&mut self) {
        self.shutdown();
    }
}
