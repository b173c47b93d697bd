//! The audit log: one JSON line per assignment and change, appended with one
//! `write(2)` before the caller hears back (so a crash of the daemon loses none) and
//! synced to disk within a second (so a power loss loses at most the last second's
//! lines; the lease table itself, which says who holds which device, is synced
//! before every answer). auditd's default flush works the same way: a sync per line
//! would put a disk flush in every request's path.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::json;

use super::store::now;

/// How long a line may stay in the page cache only.
const SYNC_EVERY: Duration = Duration::from_secs(1);

pub struct Audit {
    file: Option<Arc<Log>>,
}

struct Log {
    file: Mutex<File>,
    /// The same file, for syncing without holding up the writers.
    sync: File,
    /// Lines written since the last sync.
    dirty: AtomicBool,
}

impl Log {
    fn sync_if_dirty(&self) {
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.sync.sync_data() {
                eprintln!("vfio-manager: audit log: cannot sync it to disk: {e}");
            }
        }
    }
}

impl Audit {
    /// Appends to `path` (created with its directory); `None` logs to stderr only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let Some(p) = path else {
            return Ok(Audit { file: None });
        };
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            super::own_dir(dir, 0o750)?;
        }
        // Readable by root and the log's group (adm on Debian), nobody else: it
        // names every VM and device.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(p)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        let log = Arc::new(Log {
            sync: file.try_clone()?,
            file: Mutex::new(file),
            dirty: AtomicBool::new(false),
        });
        let weak: Weak<Log> = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || loop {
                std::thread::sleep(SYNC_EVERY);
                match weak.upgrade() {
                    Some(log) => log.sync_if_dirty(),
                    None => return,
                }
            })?;
        Ok(Audit { file: Some(log) })
    }

    pub fn record(
        &self,
        uid: u32,
        op: &str,
        lease: &str,
        vm: &str,
        devices: &[String],
        result: &str,
    ) {
        // Bounded whatever a caller sent: a refused megabyte is a line, not a flood.
        let devices: Vec<&str> = devices
            .iter()
            .take(MAX_DEVICES)
            .map(|d| clip(d, 64))
            .collect();
        let line = json!({
            "time": now(), "uid": uid, "op": clip(op, 64), "lease": clip(lease, 64),
            "vm": clip(vm, 256), "devices": devices, "result": clip(result, MAX_RESULT),
        })
        .to_string()
            + "\n";
        // To the journal too, in one write (eprintln! writes each piece on its own).
        let _ = std::io::stderr().write_all(format!("vfio-manager: audit: {line}").as_bytes());
        if let Some(log) = &self.file {
            // One write(2) of the whole line with its newline (O_APPEND): a crash
            // never leaves half a line.
            let mut file = log.file.lock().unwrap_or_else(|e| e.into_inner());
            match file.write_all(line.as_bytes()) {
                Ok(()) => log.dirty.store(true, Ordering::Release),
                Err(e) => eprintln!("vfio-manager: audit log: {e}"),
            }
        }
    }
}

/// The most devices one line names (a request asks for 64 at most).
const MAX_DEVICES: usize = 64;
/// The most of an outcome one line keeps.
const MAX_RESULT: usize = 1024;

/// `s` cut to at most `max` bytes, at a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Drop for Audit {
    /// A clean stop leaves every line on disk.
    fn drop(&mut self) {
        if let Some(log) = &self.file {
            log.sync_if_dirty();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_bounded_whatever_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::open(Some(&path)).unwrap();
        let huge = "é".repeat(1 << 20);
        let many = vec!["d".repeat(100); 10_000];
        a.record(0, &huge, &huge, &huge, &many, &huge);
        drop(a);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.len() < 8 << 10, "{} bytes", text.len());
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["devices"].as_array().unwrap().len(), MAX_DEVICES);
    }
}
