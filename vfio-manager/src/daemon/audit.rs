//! The audit log: one JSON line per assignment and change, appended and synced to
//! disk (with the other callers' lines, see `durable`) before the caller hears
//! back, so that who had which device is never lost.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::json;

use super::durable::GroupSync;
use super::store::now;

pub struct Audit {
    file: Option<(Mutex<File>, GroupSync)>,
}

impl Audit {
    /// Appends to `path` (created with its directory); `None` logs to stderr only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let f = OpenOptions::new().create(true).append(true).open(p)?;
                Some((Mutex::new(f.try_clone()?), GroupSync::new(f)))
            }
            None => None,
        };
        Ok(Audit { file })
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
        let line = json!({
            "time": now(), "uid": uid, "op": op, "lease": lease, "vm": vm,
            "devices": devices, "result": result,
        })
        .to_string();
        eprintln!("vfio-manager: audit: {line}");
        if let Some((f, sync)) = &self.file {
            let written = writeln!(f.lock().unwrap_or_else(|e| e.into_inner()), "{line}");
            if let Err(e) = written.and_then(|_| sync.sync()) {
                eprintln!("vfio-manager: audit log: {e}");
            }
        }
    }
}
