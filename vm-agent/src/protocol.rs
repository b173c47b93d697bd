//! The agent's wire protocol (docs/agent-protocol.md): frames of a 4-byte big-endian
//! length and that many bytes of JSON, one message each, at most [`MAX_FRAME`]
//! bytes. Every message carries the protocol version (`"v": 1`) and its type. A
//! frame that is too long, not JSON, of another version or of an unknown type is an
//! error: the reader drops the connection rather than guess. Both ends use this
//! module: the agent to speak, the daemon to check what a guest says.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub const VERSION: u16 = 1;
/// The largest frame body either end accepts.
pub const MAX_FRAME: usize = 64 * 1024;
/// The most devices one message may list.
pub const MAX_DEVICES: usize = 256;
/// The longest string field (an address, a driver, a kernel release, a detail).
pub const MAX_TEXT: usize = 256;

/// A PCI function as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDevice {
    /// The guest's address for it (not the host's).
    pub address: String,
    /// `vvvv:dddd`.
    pub id: String,
    /// The guest driver bound to it; empty for none.
    pub driver: String,
}

/// What one device did since the agent started, by the best source the guest has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub address: String,
    /// `net` (a NIC's byte counters: the emulated stand-ins), later `drm-fdinfo`,
    /// `amdgpu`, `nvidia-smi`.
    pub source: String,
    /// Busy share over the last interval, 0-100, where the source says.
    pub busy_percent: Option<f32>,
    /// Bytes moved since boot, where the source counts them.
    pub bytes: Option<u64>,
    /// Device memory in use, 0-100, where the source says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<f32>,
    /// Degrees Celsius, where the source gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f32>,
}

/// One message, by its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Message {
    /// Agent to host, first: who speaks and what the guest sees.
    Hello {
        agent: String,
        kernel: String,
        devices: Vec<GuestDevice>,
    },
    /// Agent to host, every interval.
    Heartbeat { seq: u64 },
    /// Agent to host: a sample per device (each interval, and on `report-now`).
    Usage { samples: Vec<Usage> },
    /// Host to agent: send a `usage` now.
    ReportNow,
    /// Host to agent: unbind the guest driver of the device at this guest address.
    LetGo { address: String },
    /// Agent to host: what came of a `let-go`.
    LetGoDone {
        address: String,
        ok: bool,
        detail: String,
    },
}

/// The frame body: the version beside the message's own fields.
#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u16,
    #[serde(flatten)]
    message: Message,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("a frame of {0} bytes; at most {MAX_FRAME}")]
    TooLong(usize),
    #[error("a frame that is not a message of this protocol: {0}")]
    Malformed(String),
    #[error("protocol version {0}; this end speaks {VERSION}")]
    Version(u16),
    #[error("{0}")]
    OutOfBounds(String),
    #[error("reading or writing a frame: {0}")]
    Io(#[from] io::Error),
}

/// `m`'s frame body, checked: what goes on the wire after the length.
pub fn body(m: &Message) -> Result<Vec<u8>, ProtocolError> {
    check(m)?;
    let body = serde_json::to_vec(&Envelope {
        v: VERSION,
        message: m.clone(),
    })
    .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    match body.len() > MAX_FRAME {
        true => Err(ProtocolError::TooLong(body.len())),
        false => Ok(body),
    }
}

/// `m` as one frame: the body's length, big-endian, then the body.
pub fn frame(m: &Message) -> Result<Vec<u8>, ProtocolError> {
    let body = body(m)?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a frame's prefix announces, refused before the body is read
/// when too long.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    match u32::from_be_bytes(prefix) as usize {
        len if len > MAX_FRAME => Err(ProtocolError::TooLong(len)),
        len => Ok(len),
    }
}

/// Writes `m` as one frame.
pub fn write(w: &mut (impl Write + ?Sized), m: &Message) -> Result<(), ProtocolError> {
    w.write_all(&frame(m)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame: its length first ([`body_len`]), then the body, checked.
pub fn read(r: &mut (impl Read + ?Sized)) -> Result<Message, ProtocolError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        r => r?,
    }
    let mut body = vec![0u8; body_len(prefix)?];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// A frame body as a message, checked.
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    // The version first, so that another version's message says so, not "malformed".
    let v = serde_json::from_slice::<serde_json::Value>(body)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?
        .get("v")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ProtocolError::Malformed("no version (\"v\")".into()))?;
    if v != u64::from(VERSION) {
        return Err(ProtocolError::Version(v.min(u64::from(u16::MAX)) as u16));
    }
    let e: Envelope =
        serde_json::from_slice(body).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    check(&e.message)?;
    Ok(e.message)
}

/// The bounds every message keeps: lists and strings, and sane numbers.
fn check(m: &Message) -> Result<(), ProtocolError> {
    let text = |what: &str, s: &str| {
        if s.len() > MAX_TEXT || s.chars().any(char::is_control) {
            return Err(ProtocolError::OutOfBounds(format!(
                "{what}: at most {MAX_TEXT} bytes without control characters"
            )));
        }
        Ok(())
    };
    let count = |what: &str, n: usize| match n > MAX_DEVICES {
        true => Err(ProtocolError::OutOfBounds(format!(
            "{n} {what}; at most {MAX_DEVICES}"
        ))),
        false => Ok(()),
    };
    match m {
        Message::Hello {
            agent,
            kernel,
            devices,
        } => {
            text("agent", agent)?;
            text("kernel", kernel)?;
            count("devices", devices.len())?;
            for d in devices {
                text("address", &d.address)?;
                text("id", &d.id)?;
                text("driver", &d.driver)?;
            }
        }
        Message::Usage { samples } => {
            count("samples", samples.len())?;
            for u in samples {
                text("address", &u.address)?;
                text("source", &u.source)?;
                let out = |v: Option<f32>, range: std::ops::RangeInclusive<f32>| {
                    v.is_some_and(|b| !range.contains(&b)) // NaN too
                };
                if out(u.busy_percent, 0.0..=100.0) || out(u.memory_percent, 0.0..=100.0) {
                    return Err(ProtocolError::OutOfBounds(
                        "busy_percent and memory_percent: 0 to 100".into(),
                    ));
                }
                if out(u.temperature_c, -273.0..=1000.0) {
                    return Err(ProtocolError::OutOfBounds(
                        "temperature_c: -273 to 1000".into(),
                    ));
                }
            }
        }
        Message::LetGo { address } => text("address", address)?,
        Message::LetGoDone {
            address, detail, ..
        } => {
            text("address", address)?;
            text("detail", detail)?;
        }
        Message::Heartbeat { .. } | Message::ReportNow => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let mut buf = Vec::new();
        write(&mut buf, &m).unwrap();
        assert_eq!(read(&mut buf.as_slice()).unwrap(), m);
    }

    #[test]
    fn every_message_survives_the_round_trip() {
        round_trip(Message::Hello {
            agent: "vm-agent 0.1.0".into(),
            kernel: "6.12.0".into(),
            devices: vec![GuestDevice {
                address: "0000:04:00.0".into(),
                id: "8086:10ca".into(),
                driver: "igbvf".into(),
            }],
        });
        round_trip(Message::Heartbeat { seq: 7 });
        round_trip(Message::Usage {
            samples: vec![Usage {
                address: "0000:04:00.0".into(),
                source: "net".into(),
                busy_percent: None,
                memory_percent: None,
                temperature_c: None,
                bytes: Some(1 << 40),
            }],
        });
        round_trip(Message::ReportNow);
        round_trip(Message::LetGo {
            address: "0000:04:00.0".into(),
        });
        round_trip(Message::LetGoDone {
            address: "0000:04:00.0".into(),
            ok: true,
            detail: String::new(),
        });
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let mut buf = Vec::new();
        write(&mut buf, &Message::Heartbeat { seq: 1 }).unwrap();
        let body = br#"{"v":1,"type":"heartbeat","seq":1}"#;
        assert_eq!(&buf[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&buf[4..], body);
    }

    /// What a lying or broken peer may send: each is refused with why, and a long
    /// frame before its body is read.
    #[test]
    fn hostile_frames_are_refused() {
        let frame = |body: &[u8]| {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            ((u32::MAX).to_be_bytes().to_vec(), "at most"),
            (frame(b"not json"), "not a message"),
            (frame(br#"{"type":"heartbeat","seq":1}"#), "no version"),
            (frame(br#"{"v":2,"type":"heartbeat","seq":1}"#), "version 2"),
            (frame(br#"{"v":1,"type":"format-disk"}"#), "not a message"),
            (frame(br#"{"v":1,"type":"heartbeat","seq":-1}"#), "not a message"),
            (frame(br#"{"v":1,"type":"heartbeat","seq":1,"extra":0}"#), "not a message"),
            (frame(format!(r#"{{"v":1,"type":"let-go","address":"{}"}}"#, "a".repeat(300)).as_bytes()), "at most 256"),
            (frame(br#"{"v":1,"type":"let-go","address":"a\nb"}"#), "control"),
            (frame(br#"{"v":1,"type":"usage","samples":[{"address":"x","source":"net","busy_percent":101.0,"bytes":null}]}"#), "0 to 100"),
            (frame(&[]), "not a message"),
            (vec![0, 0, 0, 9, b'{'], "reading"),
            (vec![], "closed"),
        ];
        for (bytes, want) in cases {
            let e = read(&mut bytes.as_slice()).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?}: {e}");
        }
        let many = Message::Hello {
            agent: String::new(),
            kernel: String::new(),
            devices: vec![
                GuestDevice {
                    address: String::new(),
                    id: String::new(),
                    driver: String::new()
                };
                MAX_DEVICES + 1
            ],
        };
        assert!(write(&mut Vec::new(), &many).is_err(), "nor is one sent");
    }
}
