//! The audit log: one JSON line per assignment and change, appended and flushed
//! before the caller hears back, so that who had which device is never lost.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::json;

use super::store::now;

pub struct Audit {
    file: Option<Mutex<File>>,
}

impl Audit {
    /// Appends to `path` (created with its directory); `None` logs to stderr only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(Mutex::new(
                    OpenOptions::new().create(true).append(true).open(p)?,
                ))
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
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(f, "{line}").and_then(|_| f.sync_data());
        }
    }
}
