//! Where the guests' agents (vm-agent) enter the daemon: a vsock listener (QEMU's
//! vhost-vsock), a Unix listener per `unix:` channel (cloud-hypervisor's vsock),
//! and a connector per `serial:` channel (a virtio-serial port QEMU binds). Each
//! connection is one agent, whose lease is known by its channel alone
//! (`core::usage`). What it says is checked (`vm_agent::protocol`), and a frame
//! that is too long, malformed, too slow or too frequent ends the connection with
//! a log line naming the VM; it never changes another lease.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use vm_agent::protocol::{self, Message, ProtocolError};
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use super::core::{Core, UsageEvent};
use super::dbus::Manager;
use crate::api::ids::{AgentChannel, OnIdle};
use crate::api::{self, ApiError};

/// The most one agent may send: a frame a second is its pace; bursts (report-now
/// answers) are allowed up to this many in the window.
const MAX_FRAMES_PER_WINDOW: usize = 50;
const WINDOW: Duration = Duration::from_secs(10);
/// A frame's body must follow its length within this (a slow drip is dropped).
const FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// The hello must come this soon after the connection.
const HELLO_DEADLINE: Duration = Duration::from_secs(30);
/// A silent agent (no heartbeat) is dropped after this.
const SILENCE: Duration = Duration::from_secs(3600 * 2);

/// Who waits for a let-go's answer (whether the agent let go, and its words).
type Answer = oneshot::Sender<(bool, String)>;

/// The agents connected now: how to send each a request, and the let-goes they
/// owe an answer, by (lease, guest address).
#[derive(Default)]
pub struct Agents {
    senders: Mutex<BTreeMap<String, mpsc::Sender<Message>>>,
    let_goes: Mutex<BTreeMap<(String, String), Answer>>,
    /// The channels leases name now (refreshed each second).
    live: Mutex<BTreeSet<AgentChannel>>,
    /// Each lease's open sessions: one agent per VM, and one more while it
    /// reconnects; a guest cannot pile connections up.
    sessions: Mutex<BTreeMap<String, usize>>,
}

/// The most sessions one lease may hold at once.
const MAX_SESSIONS: usize = 2;

/// A lease's session slot, given back when dropped.
struct Slot<'a>(&'a Agents, String);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.sessions.lock() {
            if let Some(n) = s.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    s.remove(&self.1);
                }
            }
        }
    }
}

impl Agents {
    /// A session slot for `lease`, unless it holds [`MAX_SESSIONS`] already.
    fn enter(&self, lease: &str) -> Option<Slot<'_>> {
        let mut s = self.sessions.lock().ok()?;
        let n = s.entry(lease.to_string()).or_default();
        if *n >= MAX_SESSIONS {
            return None;
        }
        *n += 1;
        Some(Slot(self, lease.to_string()))
    }

    fn live(&self, ch: &AgentChannel) -> bool {
        self.live.lock().is_ok_and(|l| l.contains(ch))
    }

    fn sender(&self, lease: &str) -> Option<mpsc::Sender<Message>> {
        self.senders.lock().ok()?.get(lease).cloned()
    }

    /// Asks `lease`'s agent to let go of its device at `guest`; its answer, or why
    /// there is none within `wait`.
    pub async fn let_go(&self, lease: &str, guest: &str, wait: Duration) -> Result<String, String> {
        let tx = self.sender(lease).ok_or("its agent is not connected")?;
        let (done, answer) = oneshot::channel();
        if let Ok(mut l) = self.let_goes.lock() {
            l.insert((lease.to_string(), guest.to_string()), done);
        }
        let address = guest.to_string();
        tx.send(Message::LetGo { address })
            .await
            .map_err(|_| "its agent left")?;
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok((true, detail))) => Ok(detail),
            Ok(Ok((false, detail))) => Err(format!("the agent could not: {detail}")),
            Ok(Err(_)) => Err("its agent left before answering".into()),
            Err(_) => Err(format!("no answer in {} s", wait.as_secs())),
        }
    }
}

/// What every agent task shares: the daemon's core, its bus connection (for
/// signals) and the agents connected now.
#[derive(Clone)]
struct Hub {
    core: Arc<Core>,
    conn: Connection,
    agents: Arc<Agents>,
}

/// Who is on one connection.
struct Peer {
    ch: AgentChannel,
    lease: String,
    vm: String,
}

/// Serves every agent channel until the daemon stops.
pub async fn serve(core: Arc<Core>, conn: Connection) {
    let agents = Arc::new(Agents::default());
    let hub = Hub {
        core: core.clone(),
        conn,
        agents: agents.clone(),
    };
    let port = core.config().usage.vsock_port;
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    match tokio_vsock::VsockListener::bind(addr) {
        Ok(l) => {
            tokio::spawn(vsock_accept(l, hub.clone()));
        }
        Err(e) => eprintln!(
            "vfio-manager: agents: not listening on vsock port {port} ({e}); unix: and serial: channels only"
        ),
    }
    // Each Unix channel's task, until it ends (its lease went).
    let mut served: BTreeMap<AgentChannel, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        let c = core.clone();
        let wanted = tokio::task::spawn_blocking(move || {
            c.usage().forget_released();
            c.usage().channels()
        })
        .await
        .unwrap_or_default();
        if let Ok(mut live) = agents.live.lock() {
            *live = wanted.iter().cloned().collect();
        }
        served.retain(|_, task| !task.is_finished());
        for ch in wanted {
            if served.contains_key(&ch) {
                continue;
            }
            let task = match &ch {
                AgentChannel::Unix(p) => {
                    tokio::spawn(unix_accept(p.clone(), ch.clone(), hub.clone()))
                }
                AgentChannel::Serial(p) => {
                    tokio::spawn(serial_connect(p.clone(), ch.clone(), hub.clone()))
                }
                _ => continue,
            };
            served.insert(ch, task);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn vsock_accept(l: tokio_vsock::VsockListener, hub: Hub) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                let ch = AgentChannel::Vsock(peer.cid());
                tokio::spawn(session(s, ch, hub.clone()));
            }
            Err(e) => {
                eprintln!("vfio-manager: agents: vsock accept: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Listens on a `unix:` channel while a lease names it. A stale socket file is
/// replaced; anything else there is left alone.
async fn unix_accept(path: String, ch: AgentChannel, hub: Hub) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        }
    }
    let l = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vfio-manager: agents: cannot listen on {path}: {e}");
            return;
        }
    };
    while hub.agents.live(&ch) {
        match tokio::time::timeout(Duration::from_secs(1), l.accept()).await {
            Ok(Ok((s, _))) => {
                tokio::spawn(session(s, ch.clone(), hub.clone()));
            }
            Ok(Err(e)) => eprintln!("vfio-manager: agents: {path}: {e}"),
            Err(_) => {}
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Connects to a `serial:` channel's socket while a lease names it, again after
/// each session ends (the VM restarted, or QEMU is not up yet).
async fn serial_connect(path: String, ch: AgentChannel, hub: Hub) {
    while hub.agents.live(&ch) {
        if let Ok(s) = tokio::net::UnixStream::connect(&path).await {
            session(s, ch.clone(), hub.clone()).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads one frame: the length, refused before the body when too long; the body
/// within `FRAME_DEADLINE`.
async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
    idle: Duration,
) -> Result<Message, ProtocolError> {
    let mut prefix = [0u8; 4];
    match tokio::time::timeout(idle, r.read_exact(&mut prefix)).await {
        Err(_) => {
            return Err(ProtocolError::Malformed(format!(
                "silent for {} s",
                idle.as_secs()
            )))
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Ok(r) => r?,
    };
    let len = protocol::body_len(prefix)?;
    let mut body = vec![0u8; len];
    tokio::time::timeout(FRAME_DEADLINE, r.read_exact(&mut body))
        .await
        .map_err(|_| {
            ProtocolError::Malformed(format!(
                "a frame of {len} bytes did not arrive in {} s",
                FRAME_DEADLINE.as_secs()
            ))
        })??;
    protocol::decode(&body)
}

async fn write_frame(w: &mut (impl AsyncWrite + Unpin), m: &Message) -> Result<(), ProtocolError> {
    w.write_all(&protocol::frame(m)?).await?;
    Ok(())
}

/// One agent's connection, until it ends or breaks the protocol.
async fn session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    ch: AgentChannel,
    hub: Hub,
) {
    let (c, ch2) = (hub.core.clone(), ch.clone());
    let Ok(Some((lease, vm))) = tokio::task::spawn_blocking(move || c.usage().lease_of(&ch2)).await
    else {
        eprintln!("vfio-manager: agents: {ch}: no lease names this channel; connection dropped");
        return;
    };
    let Some(_slot) = hub.agents.enter(&lease) else {
        eprintln!("vfio-manager: agents: VM {vm} (lease {lease}, {ch}): dropped: it has {MAX_SESSIONS} connections open already");
        return;
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Message>(8);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_frame(&mut wr, &m).await.is_err() {
                break;
            }
        }
    });
    let peer = Peer { ch, lease, vm };
    let why = converse(&mut rd, &tx, &peer, &hub).await;
    let Peer { ch, lease, vm } = peer;
    eprintln!("vfio-manager: agents: VM {vm} (lease {lease}, {ch}): {why}");
    if let Ok(mut s) = hub.agents.senders.lock() {
        if s.get(&lease).is_some_and(|t| t.same_channel(&tx)) {
            s.remove(&lease);
        }
    }
    writer.abort();
    let (c, l) = (hub.core.clone(), lease.clone());
    let release = tokio::task::spawn_blocking(move || c.usage().lost(&l))
        .await
        .unwrap_or(false);
    if let Ok(e) = SignalEmitter::new(&hub.conn, api::MANAGER_PATH) {
        let _ = Manager::agent_lost(&e, &lease, &vm, &why).await;
    }
    if release {
        // The VMM closes the devices as it exits, just after the guest's vsock goes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let c = hub.core.clone();
        if let Ok(Some(line)) =
            tokio::task::spawn_blocking(move || c.usage().release_if_stopped(&lease)).await
        {
            eprintln!("vfio-manager: usage: {line}");
        }
    }
}

/// The messages of one session; returns why it ended.
async fn converse(
    rd: &mut (impl AsyncRead + Unpin),
    tx: &mpsc::Sender<Message>,
    peer: &Peer,
    hub: &Hub,
) -> String {
    let Peer { ch, lease, vm } = peer;
    let mut recent: std::collections::VecDeque<Instant> = Default::default();
    let mut helloed = false;
    loop {
        let idle = if helloed { SILENCE } else { HELLO_DEADLINE };
        let m = match read_frame(rd, idle).await {
            Ok(m) => m,
            Err(ProtocolError::Closed) => return "the agent closed the connection".into(),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return "the connection was reset (the VM stopped, or its agent)".into()
            }
            Err(e) => return format!("dropped: {e}"),
        };
        let now = Instant::now();
        recent.push_back(now);
        while recent.front().is_some_and(|t| now - *t > WINDOW) {
            recent.pop_front();
        }
        if recent.len() > MAX_FRAMES_PER_WINDOW {
            return format!(
                "dropped: more than {MAX_FRAMES_PER_WINDOW} frames in {} s",
                WINDOW.as_secs()
            );
        }
        let (c, l) = (hub.core.clone(), lease.clone());
        match m {
            Message::Hello {
                agent,
                kernel,
                devices,
            } => {
                let again = std::mem::replace(&mut helloed, true);
                let (ch2, a2, k2) = (ch.clone(), agent.clone(), kernel.clone());
                let pairs = tokio::task::spawn_blocking(move || {
                    c.usage().hello(&l, &ch2, &a2, &k2, devices)
                })
                .await
                .unwrap_or_default();
                if let Ok(mut s) = hub.agents.senders.lock() {
                    s.insert(lease.clone(), tx.clone());
                }
                // A sample now, not an interval later.
                let _ = tx.try_send(Message::ReportNow);
                let sees = match pairs.is_empty() {
                    true => "none of the lease's devices".to_string(),
                    false => pairs.join(", "),
                };
                let what = if again {
                    "says hello again"
                } else {
                    "connected"
                };
                eprintln!(
                    "vfio-manager: agents: VM {vm} (lease {lease}) {what}: {agent}, kernel {kernel}, sees {sees}"
                );
                if again {
                    continue;
                }
                if let Ok(e) = SignalEmitter::new(&hub.conn, api::MANAGER_PATH) {
                    let _ = Manager::agent_connected(&e, lease, vm, &agent, &kernel).await;
                }
            }
            _ if !helloed => return "dropped: it spoke before its hello".into(),
            Message::Heartbeat { .. } => {
                let _ = tokio::task::spawn_blocking(move || c.usage().heartbeat(&l)).await;
            }
            Message::Usage { samples } => {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let events =
                    tokio::task::spawn_blocking(move || c.usage().sample(&l, &samples, at))
                        .await
                        .unwrap_or_default();
                // Apart from this loop: an unplug waits for the agent's
                // let-go-done, which this loop reads.
                let hub = hub.clone();
                tokio::spawn(async move {
                    for e in events {
                        act(e, &hub).await;
                    }
                });
            }
            Message::LetGoDone {
                address,
                ok,
                detail,
            } => {
                let waiting = hub
                    .agents
                    .let_goes
                    .lock()
                    .ok()
                    .and_then(|mut l| l.remove(&(lease.clone(), address)));
                if let Some(w) = waiting {
                    let _ = w.send((ok, detail));
                }
            }
            other => return format!("dropped: it sent {other:?}, which only the host sends"),
        }
    }
}

/// What a usage event sets off: its signal, and for an idle lease its policy.
async fn act(e: UsageEvent, hub: &Hub) {
    let Ok(emitter) = SignalEmitter::new(&hub.conn, api::MANAGER_PATH) else {
        return;
    };
    match e {
        UsageEvent::Alert {
            lease,
            vm,
            device,
            metric,
            level,
            value,
        } => {
            eprintln!(
                "vfio-manager: usage: VM {vm} (lease {lease}): {metric} {level} on {device} ({value:.1})"
            );
            let _ = Manager::usage_alert(&emitter, &lease, &device, metric, level, value).await;
        }
        UsageEvent::Idle {
            lease,
            vm,
            devices,
            action,
        } => {
            let detail = match action {
                OnIdle::Notify => "nothing changes".to_string(),
                OnIdle::ReleaseOnStop => {
                    hub.core.usage().release_on_stop(&lease);
                    "the lease ends when its VM stops".to_string()
                }
                OnIdle::Unplug => {
                    let mut done = Vec::new();
                    for d in &devices {
                        done.push(format!("{d}: {}", unplug(&lease, d, hub).await));
                    }
                    done.join("; ")
                }
            };
            eprintln!(
                "vfio-manager: usage: VM {vm} (lease {lease}): idle; on_idle is {action}: {detail}"
            );
            let _ = Manager::lease_idle(&emitter, &lease, &vm, &action.to_string(), &detail).await;
        }
    }
}

/// `unplug` of one idle device: the agent lets go first, then `core` reclaims it.
async fn unplug(lease: &str, device: &str, hub: &Hub) -> String {
    let core = &hub.core;
    let wait = Duration::from_secs(core.config().usage.let_go_timeout_s);
    let let_go = match core.usage().guest_address(lease, device) {
        Some(g) => hub.agents.let_go(lease, &g, wait).await,
        None => Err("the guest does not list it".into()),
    };
    // A guest that could not let go still loses the device: it was idle.
    let said = match let_go {
        Ok(d) => format!("the guest let go ({d})"),
        Err(e) => format!("the guest did not let go ({e})"),
    };
    let (c, l, d) = (core.clone(), lease.to_string(), device.to_string());
    let why = format!("idle; {said}");
    let r = tokio::task::spawn_blocking(move || c.usage().reclaim(&l, &d, &why))
        .await
        .unwrap_or_else(|e| Err(ApiError::Failed(e.to_string())));
    match r {
        Ok(s) => format!("{said}; {s}"),
        Err(e) => format!("{said}; not reclaimed: {e}"),
    }
}
