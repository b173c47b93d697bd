//! An API socket that answers as cloud-hypervisor's REST API documents
//! (vm.add-device, vm.remove-device, vm.info, vmm.ping), for the tests of
//! `vfctl attach` and of swaps into a running VM.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// The VM as the API server holds it.
#[derive(Default)]
pub struct Vm {
    /// Its devices (id -> path).
    pub devices: Mutex<BTreeMap<String, String>>,
    /// Set: the VMM exits on the next vm.info, unanswered (its socket goes).
    pub exit_on_info: AtomicBool,
    /// Set: created, not booted. cloud-hypervisor then answers vm.add-device with
    /// 204 and no body, and keeps the device in the configuration for the boot.
    pub not_booted: AtomicBool,
    /// Set: vm.remove-device answers after this many milliseconds (a guest slow
    /// to let go), so that a test can cut the caller off meanwhile.
    pub remove_delay_ms: std::sync::atomic::AtomicU64,
}

/// Serves cloud-hypervisor's API on `socket` until the socket file is removed.
/// Adding a device whose path contains `fail_path` answers HTTP 500.
pub fn api_server(socket: &Path, fail_path: Option<&str>) -> Arc<Vm> {
    let listener = UnixListener::bind(socket).unwrap();
    let vm: Arc<Vm> = Arc::default();
    let (v, fail, path) = (vm.clone(), fail_path.map(str::to_string), socket.to_owned());
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            serve(s, &v, fail.as_deref(), &path);
        }
    });
    vm
}

fn serve(s: UnixStream, vm: &Vm, fail: Option<&str>, socket: &Path) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if path == "/api/v1/vm.info" && vm.exit_on_info.load(Ordering::SeqCst) {
        std::fs::remove_file(socket).unwrap();
        return;
    }
    let mut devs = vm.devices.lock().unwrap();
    let (status, answer) = match path.as_str() {
        "/api/v1/vm.add-device" => {
            let p = req["path"].as_str().unwrap().to_string();
            if fail.is_some_and(|f| p.contains(f)) {
                (500, json!("Failed to add VFIO device").to_string())
            } else {
                let id = req["id"].as_str().unwrap().to_string();
                devs.insert(id.clone(), p);
                let bdf = format!("0000:00:{:02x}.0", 5 + devs.len());
                if vm.not_booted.load(Ordering::SeqCst) {
                    (204, String::new())
                } else {
                    (200, json!({ "id": id, "bdf": bdf }).to_string())
                }
            }
        }
        "/api/v1/vm.remove-device" => {
            devs.remove(req["id"].as_str().unwrap());
            let delay = vm.remove_delay_ms.load(Ordering::SeqCst);
            drop(devs);
            std::thread::sleep(std::time::Duration::from_millis(delay));
            let mut w = s;
            let _ = write!(w, "HTTP/1.1 204 X\r\nContent-Length: 0\r\n\r\n");
            return;
        }
        "/api/v1/vm.info" => {
            let list: Vec<Value> = devs
                .iter()
                .map(|(id, p)| json!({ "id": id, "path": p }))
                .collect();
            (
                200,
                json!({ "state": if vm.not_booted.load(Ordering::SeqCst) { "Created" } else { "Running" }, "config": { "devices": list } }).to_string(),
            )
        }
        "/api/v1/vmm.ping" => (200, json!({ "version": "v45.0" }).to_string()),
        _ => (404, String::new()),
    };
    let mut w = s;
    let _ = write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{answer}",
        answer.len()
    );
}
