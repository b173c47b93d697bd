//! Group commit for files the daemon must have on disk before it answers (the
//! state table's write-ahead log, the audit log).
//!
//! An fsync covers every write made before it *started*. So a caller whose write
//! lands while another caller's fsync runs does not start its own: it waits for
//! that one to end, and then one fsync is started for everyone who came in the
//! meantime. Under 32 concurrent clients that is a handful of fsyncs a second
//! instead of one per write, each caller still answered only once its write is
//! durable.

use std::fs::File;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

pub struct GroupSync {
    file: File,
    state: Mutex<State>,
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// Callers so far, numbered from 1 in the order they asked.
    asked: u64,
    /// Every caller up to this number has its write on disk.
    synced: u64,
    /// An fsync is running.
    running: bool,
}

impl GroupSync {
    pub fn new(file: File) -> GroupSync {
        GroupSync {
            file,
            state: Mutex::new(State::default()),
            finished: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once everything written to the file before this call is on disk.
    pub fn sync(&self) -> io::Result<()> {
        let mut s = self.state();
        s.asked += 1;
        let mine = s.asked;
        loop {
            if s.synced >= mine {
                return Ok(());
            }
            if !s.running {
                // Ours covers everyone who has asked so far.
                let upto = s.asked;
                s.running = true;
                drop(s);
                let r = self.file.sync_data();
                s = self.state();
                s.running = false;
                if r.is_ok() {
                    s.synced = upto;
                }
                self.finished.notify_all();
                // On failure the callers waiting try again themselves.
                return r;
            }
            s = self.finished.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_each_return_after_their_write_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let file = File::create(&path).unwrap();
        let sync = Arc::new(GroupSync::new(file.try_clone().unwrap()));
        let writer = Arc::new(Mutex::new(file));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (sync, writer) = (sync.clone(), writer.clone());
                std::thread::spawn(move || {
                    for j in 0..20 {
                        writeln!(writer.lock().unwrap(), "{i} {j}").unwrap();
                        sync.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = sync.state();
        assert_eq!(s.asked, 320);
        assert_eq!(s.synced, 320, "the last caller's write was synced");
        assert!(!s.running);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 320);
    }
}
