//! The hook binary run as libvirt runs it, for the tests.

use std::io::Write;
use std::process::{Command, Stdio};

const HOOK: &str = env!("CARGO_BIN_EXE_vfio-manager-hook");

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the hook as libvirt does: domain `vm1`, `op` `sub`, XML on stdin.
pub fn hook(bus: &str, op: &str, sub: &str, xml: &str) -> Run {
    let mut child = Command::new(HOOK)
        .args(["vm1", op, sub, "-"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}
