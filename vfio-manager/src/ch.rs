//! cloud-hypervisor's REST API on a VM's `--api-socket`: hot-add a leased device
//! (`vm.add-device`), remove it (`vm.remove-device`), and read which devices the VM
//! has (`vm.info`). cloud-hypervisor has no hooks, so `vfctl attach` drives it and
//! the lease follows the VM. HTTP/1.1 over the Unix socket, one request per
//! connection, as its own `ch-remote` does.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ChError {
    #[error("cloud-hypervisor API socket {socket}: {source}; is the VM running with --api-socket {socket}?")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cloud-hypervisor {socket}: {request}: {what}")]
    Api {
        socket: PathBuf,
        request: String,
        what: String,
    },
}

/// What `vm.add-device` answers: the device id and its address in the guest. A VM
/// created but not booted answers 204 with no body: the device went into its
/// configuration and is opened at boot, with no guest address yet (`bdf: None`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: Option<String>,
}

/// A device the VM has: its id and, for VFIO devices, the host sysfs path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDevice {
    pub id: String,
    pub path: String,
}

pub struct ChClient {
    socket: PathBuf,
}

impl ChClient {
    pub fn new(socket: &Path) -> ChClient {
        ChClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Hot-adds the VFIO device at sysfs `path` under `id`.
    pub fn add_device(&self, path: &str, id: &str) -> Result<PciDeviceInfo, ChError> {
        let body = self.call(
            "PUT",
            "vm.add-device",
            Some(json!({ "path": path, "id": id })),
        )?;
        if body.is_null() {
            let id = id.to_string();
            return Ok(PciDeviceInfo { id, bdf: None });
        }
        serde_json::from_value(body.clone())
            .map_err(|e| self.api("vm.add-device", format!("unexpected answer {body}: {e}")))
    }

    pub fn remove_device(&self, id: &str) -> Result<(), ChError> {
        self.call("PUT", "vm.remove-device", Some(json!({ "id": id })))
            .map(|_| ())
    }

    /// The VM's VFIO devices (`config.devices` of `vm.info`).
    pub fn devices(&self) -> Result<Vec<VmDevice>, ChError> {
        let info = self.call("GET", "vm.info", None)?;
        let list = info
            .pointer("/config/devices")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(list
            .iter()
            .map(|d| VmDevice {
                id: d["id"].as_str().unwrap_or_default().to_string(),
                path: d["path"].as_str().unwrap_or_default().to_string(),
            })
            .collect())
    }

    /// Whether the VM's API still answers (false once the VMM has exited).
    pub fn alive(&self) -> bool {
        self.call("GET", "vmm.ping", None).is_ok()
    }

    fn api(&self, request: &str, what: String) -> ChError {
        ChError::Api {
            socket: self.socket.clone(),
            request: request.to_string(),
            what,
        }
    }

    /// One request; returns the JSON body (Null when there is none).
    fn call(&self, method: &str, endpoint: &str, body: Option<Value>) -> Result<Value, ChError> {
        let connect = |source| ChError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.socket).map_err(connect)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(connect)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(connect)?;
        let (status, text) =
            read_response(s).map_err(|e| self.api(endpoint, format!("bad HTTP answer: {e}")))?;
        if !(200..300).contains(&status) {
            return Err(self.api(endpoint, format!("HTTP {status}: {}", text.trim())));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| self.api(endpoint, format!("answer is not JSON ({e}): {text}")))
    }
}

/// (status, body) of one HTTP/1.1 response: the body is Content-Length bytes, or
/// what comes until the server closes.
fn read_response(s: UnixStream) -> std::io::Result<(u16, String)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("status line {line:?}")))?;
    let mut length = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None if status == 204 => {}
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The id `vfctl attach` gives a leased device in the VM: stable per address, so
/// that `detach` finds it again.
pub fn device_id(address: &str) -> String {
    format!("vfm-{}", address.replace([':', '.'], "-"))
}
