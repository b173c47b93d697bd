//! The binary as a guest runs it: `vm-agent --once` prints the hello it would
//! send, read from a guest tree of files, and changes nothing.

use std::process::Command;

#[test]
fn once_prints_the_hello_from_the_guest_tree() {
    let t = tempfile::tempdir().unwrap();
    let vf = t.path().join("sys/bus/pci/devices/0000:00:04.0");
    std::fs::create_dir_all(&vf).unwrap();
    std::fs::write(vf.join("vendor"), "0x8086\n").unwrap();
    std::fs::write(vf.join("device"), "0x10ca\n").unwrap();
    std::fs::create_dir_all(t.path().join("proc/sys/kernel")).unwrap();
    std::fs::write(t.path().join("proc/sys/kernel/osrelease"), "6.12.0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vm-agent"))
        .arg("--once")
        .arg("--root")
        .arg(t.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hello: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hello["v"], 1);
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["kernel"], "6.12.0");
    assert_eq!(hello["devices"][0]["address"], "0000:00:04.0");
    assert_eq!(hello["devices"][0]["id"], "8086:10ca");
    // A bad option is refused with a usage message, as clap does.
    let bad = Command::new(env!("CARGO_BIN_EXE_vm-agent"))
        .arg("--interval-s")
        .arg("0")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
