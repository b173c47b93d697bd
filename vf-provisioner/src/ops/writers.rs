//! Threads for the kernel writes that may block: a write runs on one while its
//! caller waits up to a bound. A write that outlasts its bound keeps its thread (the
//! kernel gives no way to cancel it); a thread whose write finished waits for the
//! next one instead of exiting, so that a release does not start a thread per reset.

use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// Idle threads kept beyond this many exit.
const KEEP_IDLE: usize = 4;

#[derive(Default)]
pub(super) struct Writers {
    /// One sender per idle thread; dropping it ends that thread.
    idle: Mutex<Vec<mpsc::Sender<Job>>>,
}

impl Writers {
    /// `f`'s result, or `None` if it has not returned within `timeout`.
    pub(super) fn run<T: Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.start(Box::new(move || {
            let _ = tx.send(f());
        }));
        rx.recv_timeout(timeout).ok()
    }

    fn idle(&self) -> MutexGuard<'_, Vec<mpsc::Sender<Job>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(self: &Arc<Self>, mut job: Job) {
        while let Some(thread) = self.idle().pop() {
            match thread.send(job) {
                Ok(()) => return,
                Err(back) => job = back.0,
            }
        }
        let pool = Arc::downgrade(self);
        thread::spawn(move || work(pool, job));
    }
}

fn work(pool: Weak<Writers>, mut job: Job) {
    loop {
        job();
        let Some(pool) = pool.upgrade() else { return };
        let (tx, rx) = mpsc::channel();
        {
            let mut idle = pool.idle();
            if idle.len() >= KEEP_IDLE {
                return;
            }
            idle.push(tx);
        }
        drop(pool);
        match rx.recv() {
            Ok(next) => job = next,
            Err(_) => return, // the provisioner is gone
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_finished_thread_takes_the_next_write() {
        let w = Arc::new(Writers::default());
        let first = w.run(Duration::from_secs(5), || thread::current().id());
        // The thread goes idle just after it hands over its result.
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.idle().is_empty() && Instant::now() < deadline {
            thread::yield_now();
        }
        let second = w.run(Duration::from_secs(5), || thread::current().id());
        assert!(first.is_some());
        assert_eq!(first, second);
    }

    #[test]
    fn a_write_past_its_bound_keeps_its_thread_and_the_next_gets_another() {
        let w = Arc::new(Writers::default());
        let (release, hung) = mpsc::channel::<()>();
        let timed_out = w.run(Duration::from_millis(20), move || hung.recv().is_ok());
        assert_eq!(timed_out, None);
        assert_eq!(w.run(Duration::from_secs(5), || 7), Some(7));
        release.send(()).unwrap();
    }
}
