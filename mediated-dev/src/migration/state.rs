//! The VFIO migration uAPI v2 state machine (linux/vfio.h, `enum
//! vfio_device_mig_state`): the states, the single arcs a device supports given
//! its migration flags, and the path the kernel walks between two states (it walks
//! multi-arc transitions itself, kernel rule 9, docs/kernel.md). The tracker records every
//! state a device passed through, so a failure can say where it was.

use std::collections::VecDeque;
use std::fmt;

use serde::Serialize;

/// `VFIO_MIGRATION_*` flags from `VFIO_DEVICE_FEATURE_MIGRATION`.
pub const STOP_COPY: u64 = 1;
pub const P2P: u64 = 2;
pub const PRE_COPY: u64 = 4;

/// `VFIO_MIGRATION_*` flags by name: `STOP_COPY P2P PRE_COPY`.
pub fn flag_names(flags: u64) -> String {
    [
        (STOP_COPY, "STOP_COPY"),
        (P2P, "P2P"),
        (PRE_COPY, "PRE_COPY"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join(" ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

const ALL: [MigState; 8] = [
    MigState::Error,
    MigState::Stop,
    MigState::Running,
    MigState::StopCopy,
    MigState::Resuming,
    MigState::RunningP2p,
    MigState::PreCopy,
    MigState::PreCopyP2p,
];

impl MigState {
    pub fn from_raw(v: u32) -> Option<MigState> {
        ALL.get(v as usize).copied()
    }

    /// States with a data fd: reading (saving) or writing (resuming).
    pub fn streams(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy | MigState::Resuming
        )
    }

    /// The single arcs from this state a device with `flags` supports.
    pub fn arcs(self, flags: u64) -> Vec<MigState> {
        use MigState::*;
        let p2p = flags & P2P != 0;
        let pre = flags & PRE_COPY != 0;
        let mut v = match self {
            Running if p2p => vec![RunningP2p],
            Running => vec![Stop],
            RunningP2p => vec![Running, Stop],
            Stop if p2p => vec![RunningP2p, StopCopy, Resuming],
            Stop => vec![Running, StopCopy, Resuming],
            StopCopy => vec![Stop],
            Resuming => vec![Stop],
            PreCopy if p2p => vec![Running, PreCopyP2p],
            PreCopy => vec![Running, StopCopy],
            PreCopyP2p => vec![PreCopy, RunningP2p, StopCopy],
            Error => vec![],
        };
        if pre {
            match self {
                Running => v.push(PreCopy),
                RunningP2p => v.push(PreCopyP2p),
                _ => {}
            }
        }
        v.retain(|s| match s {
            PreCopy | PreCopyP2p => pre,
            RunningP2p => p2p,
            _ => true,
        });
        v
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        };
        f.write_str(s)
    }
}

/// The shortest walk from `from` to `to` over supported arcs, as the kernel takes
/// it (`vfio_mig_get_next_state`); `None` if `to` cannot be reached. The kernel
/// passes through a streaming state only as the target or within one saving
/// session (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps the same data fd).
pub fn path(from: MigState, to: MigState, flags: u64) -> Option<Vec<MigState>> {
    let mut prev: [Option<MigState>; 8] = [None; 8];
    let mut seen = [false; 8];
    let mut queue = VecDeque::from([from]);
    seen[from as usize] = true;
    while let Some(s) = queue.pop_front() {
        if s == to {
            let mut out = vec![to];
            let mut cur = to;
            while let Some(p) = prev[cur as usize] {
                out.push(p);
                cur = p;
            }
            out.reverse();
            return Some(out);
        }
        let precopy = |x: MigState| matches!(x, MigState::PreCopy | MigState::PreCopyP2p);
        for n in s.arcs(flags) {
            let through_stream = n.streams() && n != to && !(precopy(s) && precopy(n));
            if !seen[n as usize] && !through_stream {
                seen[n as usize] = true;
                prev[n as usize] = Some(s);
                queue.push_back(n);
            }
        }
    }
    None
}

/// The states a device went through, as requested and as the kernel reported.
#[derive(Debug, Clone, Serialize)]
pub struct Tracker {
    pub device: String,
    pub flags: u64,
    pub history: Vec<MigState>,
}

impl Tracker {
    pub fn new(device: impl Into<String>, flags: u64, now: MigState) -> Self {
        Tracker {
            device: device.into(),
            flags,
            history: vec![now],
        }
    }

    pub fn current(&self) -> MigState {
        *self.history.last().expect("history starts with a state")
    }

    /// The arcs a move to `to` walks, or why it cannot be taken.
    pub fn plan(&self, to: MigState) -> Result<Vec<MigState>, String> {
        if to == MigState::Error {
            return Err("ERROR is entered by the device, never requested".into());
        }
        path(self.current(), to, self.flags).ok_or_else(|| {
            format!(
                "{} -> {to} is not a transition this device supports (migration flags {:#x})",
                self.current(),
                self.flags
            )
        })
    }

    pub fn record(&mut self, walked: &[MigState]) {
        self.history.extend(walked.iter().skip(1));
    }

    pub fn describe(&self) -> String {
        self.history
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}
