//! Migration on devices kept in memory (behaving like mtty's driver): the state
//! machine, the stream, the save/load policy and its failure paths, and TCP
//! between two endpoints with faults injected by a proxy in between.

use std::net::{SocketAddr, TcpListener};
use std::thread;

use mediated_dev::migration::state::{path, MigState, P2P, PRE_COPY, STOP_COPY};
use mediated_dev::migration::tls::{test_credentials, Tls};
use mediated_dev::migration::{self as mig, net, Header, MemoryDevice, MigrationDevice};
use mediated_dev::{Error, Kind};

fn header(profile: &str) -> Header {
    Header {
        device_kind: "mdev".into(),
        profile: profile.into(),
        driver: "mtty".into(),
        driver_version: "6.12".into(),
        flags: 0,
        size_hint: 0,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn the_kernel_walks_the_shortest_supported_path() {
    use MigState::*;
    assert_eq!(
        path(Running, StopCopy, STOP_COPY),
        Some(vec![Running, Stop, StopCopy])
    );
    assert_eq!(
        path(Running, StopCopy, STOP_COPY | P2P),
        Some(vec![Running, RunningP2p, Stop, StopCopy])
    );
    assert_eq!(
        path(Running, PreCopy, STOP_COPY),
        None,
        "no PRE_COPY without its flag"
    );
    assert_eq!(
        path(PreCopy, StopCopy, STOP_COPY | PRE_COPY),
        Some(vec![PreCopy, StopCopy])
    );
    assert_eq!(
        path(PreCopy, StopCopy, 7),
        Some(vec![PreCopy, PreCopyP2p, StopCopy]),
        "one saving session: the same data fd"
    );
    assert_eq!(
        path(Stop, PreCopy, 7),
        Some(vec![Stop, RunningP2p, Running, PreCopy])
    );
    assert_eq!(
        path(Resuming, Running, STOP_COPY),
        Some(vec![Resuming, Stop, Running])
    );
    assert_eq!(
        path(StopCopy, Resuming, STOP_COPY),
        Some(vec![StopCopy, Stop, Resuming])
    );
    assert_eq!(path(Running, Error, 7), None);
}

#[test]
fn save_and_load_carry_the_state_and_the_source_waits_for_commit() {
    let src = MemoryDevice::mtty_like("src", pattern(3 << 20, 1));
    let dst = MemoryDevice::mtty_like("dst", pattern(3 << 20, 9));
    let mut stream = Vec::new();
    let (out, stats) = mig::save(&src, &header("mtty-2"), &mut stream).unwrap();
    assert_eq!(stats.bytes, 3 << 20);
    assert!(stats.precopy_bytes > 0, "PRE_COPY was used");
    assert_eq!(src.state().unwrap(), MigState::Stop);
    let loaded = mig::load(&dst, &header("mtty-2"), &stream[..]).unwrap();
    assert_eq!(loaded.bytes, 3 << 20);
    assert_eq!(dst.data(), src.data());
    assert_eq!(dst.state().unwrap(), MigState::Running);
    let t = out.commit();
    assert_eq!(
        t.describe(),
        "RUNNING -> PRE_COPY -> PRE_COPY_P2P -> STOP_COPY -> STOP"
    );
    assert_eq!(
        src.state().unwrap(),
        MigState::Stop,
        "committed: stays stopped"
    );
}

#[test]
fn a_stop_copy_only_state_of_uneven_size_arrives_whole() {
    // Several batches of reads per send, the last one short, the last read short.
    let size = (5 << 19) + 7;
    let src = MemoryDevice::new("src", STOP_COPY, pattern(size, 3));
    let dst = MemoryDevice::new("dst", STOP_COPY, pattern(size, 4));
    let mut stream = Vec::new();
    let (out, stats) = mig::save(&src, &header("mtty-2"), &mut stream).unwrap();
    assert_eq!((stats.bytes, stats.precopy_bytes), (size as u64, 0));
    mig::load(&dst, &header("mtty-2"), &stream[..]).unwrap();
    assert_eq!(dst.data(), src.data());
    out.commit();
}

/// A device whose data fd fails after `reads` reads in STOP_COPY.
struct FailingRead {
    inner: MemoryDevice,
    reads: std::sync::atomic::AtomicUsize,
}

impl MigrationDevice for FailingRead {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn flags(&self) -> std::io::Result<Option<u64>> {
        self.inner.flags()
    }
    fn state(&self) -> std::io::Result<MigState> {
        self.inner.state()
    }
    fn set_state(&self, to: MigState) -> std::io::Result<()> {
        self.inner.set_state(to)
    }
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .reads
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read(buf)
    }
    fn write(&self, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(data)
    }
    fn precopy_info(&self) -> std::io::Result<(u64, u64)> {
        self.inner.precopy_info()
    }
    fn reset(&self) -> std::io::Result<()> {
        self.inner.reset()
    }
}

#[test]
fn a_device_read_failing_mid_state_returns_the_source_to_running() {
    let src = FailingRead {
        inner: MemoryDevice::new("src", STOP_COPY, pattern(3 << 20, 1)),
        reads: 6.into(),
    };
    let e = mig::save(&src, &header("mtty-2"), Vec::new())
        .err()
        .unwrap();
    let text = e.to_string();
    assert!(
        text.contains("src") && text.contains("reading STOP_COPY data"),
        "{text}"
    );
    assert_eq!(src.state().unwrap(), MigState::Running);
}

#[test]
fn an_uncommitted_source_runs_again() {
    let src = MemoryDevice::mtty_like("src", pattern(1000, 1));
    let (out, _) = mig::save(&src, &header("mtty-2"), Vec::new()).unwrap();
    drop(out);
    assert_eq!(src.state().unwrap(), MigState::Running);
}

fn corrupt_at(stream: &mut [u8], at: usize) {
    stream[at] ^= 0x40;
}

#[test]
fn a_corrupt_or_cut_stream_leaves_the_destination_running_with_its_own_state() {
    let src = MemoryDevice::mtty_like("src", pattern(100_000, 1));
    let mut stream = Vec::new();
    drop(mig::save(&src, &header("mtty-2"), &mut stream).unwrap());
    let before = pattern(100_000, 9);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("corrupt chunk", {
            let mut s = stream.clone();
            corrupt_at(&mut s, stream.len() / 2);
            s
        }),
        ("cut", stream[..stream.len() / 2].to_vec()),
        (
            "no trailer",
            stream[..stream.len() - mig::stream::TRAILER_LEN].to_vec(),
        ),
        ("half a trailer", stream[..stream.len() - 5].to_vec()),
        ("corrupt trailer", {
            let mut s = stream.clone();
            corrupt_at(&mut s, stream.len() - mig::stream::TRAILER_LEN + 2);
            s
        }),
        ("corrupt header", {
            let mut s = stream.clone();
            corrupt_at(&mut s, 20);
            s
        }),
    ];
    for (name, bad) in cases {
        let dst = MemoryDevice::mtty_like("dst", before.clone());
        let e = mig::load(&dst, &header("mtty-2"), &bad[..]).unwrap_err();
        assert!(matches!(e, Error::Migration { .. }), "{name}: {e}");
        assert_eq!(dst.state().unwrap(), MigState::Running, "{name}");
        assert_eq!(dst.data(), before, "{name}: nothing half-loaded");
    }
}

#[test]
fn an_incompatible_state_is_refused_before_the_device_is_touched() {
    let src = MemoryDevice::mtty_like("src", pattern(1000, 1));
    let mut stream = Vec::new();
    drop(mig::save(&src, &header("mtty-2"), &mut stream).unwrap());
    let dst = MemoryDevice::mtty_like("dst", pattern(1000, 9));
    let e = mig::load(&dst, &header("mtty-1"), &stream[..]).unwrap_err();
    assert_eq!(e.kind(), Kind::Refused);
    assert!(
        e.to_string()
            .contains(r#"type "mtty-2", this device is "mtty-1""#),
        "{e}"
    );
    // A future format version is named, not misread.
    let mut v2 = stream.clone();
    v2[8] = 3;
    let e = mig::load(&dst, &header("mtty-2"), &v2[..]).unwrap_err();
    assert!(e.to_string().contains("format version 3"), "{e}");
    assert_eq!(dst.data(), pattern(1000, 9));
}

#[test]
fn a_device_without_migration_is_refused_with_the_reason() {
    let dev = MemoryDevice::new("plain", 0, vec![]);
    let e = mig::check(&dev).unwrap_err();
    assert!(
        e.to_string().contains("does not offer VFIO migration v2"),
        "{e}"
    );
}

fn over_tcp(
    limit: usize,
    flip: Option<usize>,
    dst_profile: &str,
) -> (MemoryDevice, MemoryDevice, mediated_dev::Result<()>) {
    let tls = test_credentials();
    over_tls(
        &tls,
        &tls,
        |to| net::fault_proxy(to, limit, flip).unwrap(),
        dst_profile,
        net::Limits::default(),
    )
}

/// A source with `src_tls` sends 2 MiB through whatever `path` puts between it and
/// a destination with `dst_tls` and `limits`.
fn over_tls(
    src_tls: &Tls,
    dst_tls: &Tls,
    path: impl FnOnce(SocketAddr) -> SocketAddr,
    dst_profile: &str,
    limits: net::Limits,
) -> (MemoryDevice, MemoryDevice, mediated_dev::Result<()>) {
    let src = MemoryDevice::mtty_like("src", pattern(2 << 20, 1));
    let dst = MemoryDevice::mtty_like("dst", pattern(2 << 20, 9));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = path(listener.local_addr().unwrap()).to_string();
    let want = header(dst_profile);
    let result = thread::scope(|s| {
        let receiver = s.spawn(|| net::receive(&dst, &want, &listener, dst_tls, &limits));
        let sent = net::send(&src, &header("mtty-2"), &target, src_tls).map(|_| ());
        let _ = receiver.join().unwrap();
        sent
    });
    (src, dst, result)
}

/// Both ends as they were: the source runs, the destination runs with its own state.
fn untouched(src: &MemoryDevice, dst: &MemoryDevice, what: &str) {
    assert_eq!(src.state().unwrap(), MigState::Running, "{what}: source");
    assert_eq!(
        dst.state().unwrap(),
        MigState::Running,
        "{what}: destination"
    );
    assert_eq!(
        dst.data(),
        pattern(2 << 20, 9),
        "{what}: destination unchanged"
    );
}

#[test]
fn tcp_migration_moves_the_state_and_keeps_the_source_stopped() {
    let (src, dst, r) = over_tcp(usize::MAX, None, "mtty-2");
    r.unwrap();
    assert_eq!(dst.data(), src.data());
    assert_eq!(src.state().unwrap(), MigState::Stop);
    assert_eq!(dst.state().unwrap(), MigState::Running);
}

#[test]
fn tcp_faults_abort_with_the_source_running_again() {
    for (name, limit, flip, profile) in [
        ("connection cut mid-stream", 1 << 20, None, "mtty-2"),
        ("corrupted chunk", usize::MAX, Some(1 << 20), "mtty-2"),
        ("incompatible type", usize::MAX, None, "mtty-1"),
    ] {
        let (src, dst, r) = over_tcp(limit, flip, profile);
        let e = r.unwrap_err();
        untouched(&src, &dst, &format!("{name}: {e}"));
    }
}

#[test]
fn a_source_with_a_certificate_of_another_ca_is_refused() {
    let (ours, theirs) = (test_credentials(), test_credentials());
    let (src, dst, r) = over_tls(&theirs, &ours, |a| a, "mtty-2", net::Limits::default());
    let e = r.unwrap_err();
    untouched(&src, &dst, &e.to_string());
}

#[test]
fn one_time_credentials_move_the_state_between_their_two_ends_only() {
    let (dst_tls, bundle) = Tls::one_time().unwrap();
    let src_tls = Tls::from_one_time(&bundle).unwrap();
    let ok = || net::Limits::default();
    let (src, dst, r) = over_tls(&src_tls, &dst_tls, |a| a, "mtty-2", ok());
    r.unwrap();
    assert_eq!(dst.data(), src.data());
    // Another migration's bundle, or the PKI's identity, does not fit this one.
    let (_, other) = Tls::one_time().unwrap();
    let stranger = Tls::from_one_time(&other).unwrap();
    for (what, tls) in [
        ("another migration's", stranger),
        ("the PKI's", test_credentials()),
    ] {
        let (src, dst, r) = over_tls(&tls, &dst_tls, |a| a, "mtty-2", ok());
        let e = r.unwrap_err();
        untouched(&src, &dst, &format!("{what}: {e}"));
    }
    // Nor does a PKI destination take a one-time source.
    let (src, dst, r) = over_tls(&src_tls, &test_credentials(), |a| a, "mtty-2", ok());
    untouched(&src, &dst, &r.unwrap_err().to_string());
}

#[test]
fn a_one_time_bundle_that_is_not_one_is_refused_with_the_reason() {
    let (_, bundle) = Tls::one_time().unwrap();
    let key_at = bundle.find("-----BEGIN PRIVATE KEY").unwrap();
    let cases = [
        ("empty", String::new()),
        ("no key", bundle[..key_at].to_string()),
        ("a megabyte", "A".repeat(1 << 20)),
        (
            "one certificate",
            bundle[bundle.find("-----END CERTIFICATE-----").unwrap() + 26..].to_string(),
        ),
    ];
    for (what, text) in cases {
        let e = Tls::from_one_time(&text)
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert!(
            e.to_string().contains("one-time migration credentials"),
            "{what}: {e}"
        );
        assert!(e.to_string().len() < 400, "{what}: bounded: {e}");
    }
}

#[test]
fn a_plain_tcp_peer_is_refused_before_the_device_is_touched() {
    let tls = test_credentials();
    let dst = MemoryDevice::mtty_like("dst", pattern(2 << 20, 9));
    let src = MemoryDevice::mtty_like("src", pattern(2 << 20, 1));
    let mut plain = Vec::new();
    drop(mig::save(&src, &header("mtty-2"), &mut plain).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap();
    let peer = thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(to).unwrap();
        let _ = std::io::Write::write_all(&mut c, &plain);
    });
    let e = net::receive(
        &dst,
        &header("mtty-2"),
        &listener,
        &tls,
        &net::Limits::default(),
    )
    .unwrap_err();
    peer.join().unwrap();
    assert!(e.to_string().contains("TLS"), "{e}");
    assert_eq!(dst.state().unwrap(), MigState::Running);
    assert_eq!(dst.data(), pattern(2 << 20, 9));
}

/// Forwards 1 KiB every 20 ms: a peer that would hold the destination for ever.
fn drip(to: SocketAddr) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || -> std::io::Result<()> {
        let (mut from, _) = listener.accept()?;
        let mut onward = std::net::TcpStream::connect(to)?;
        let (mut back, mut reply) = (onward.try_clone()?, from.try_clone()?);
        thread::spawn(move || std::io::copy(&mut back, &mut reply));
        let mut buf = [0u8; 1024];
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 || onward.write_all(&buf[..n]).is_err() {
                return Ok(());
            }
            thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    addr
}

#[test]
fn a_source_that_drips_is_cut_at_the_deadline_and_both_ends_run_as_before() {
    let tls = test_credentials();
    let limits = net::Limits {
        deadline: std::time::Duration::from_millis(400),
        ..net::Limits::default()
    };
    let (src, dst, r) = over_tls(&tls, &tls, drip, "mtty-2", limits);
    let e = r.unwrap_err();
    untouched(&src, &dst, &e.to_string());
}

#[test]
fn a_source_that_sends_more_than_the_bound_is_cut() {
    let tls = test_credentials();
    let limits = net::Limits {
        max_bytes: 256 << 10,
        ..net::Limits::default()
    };
    let (src, dst, r) = over_tls(&tls, &tls, |a| a, "mtty-2", limits);
    let e = r.unwrap_err();
    untouched(&src, &dst, &e.to_string());
}

#[test]
fn a_destination_whose_source_never_comes_gives_up_and_keeps_its_state() {
    let dst = MemoryDevice::mtty_like("dst", pattern(4096, 9));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let limits = net::Limits {
        accept_within: std::time::Duration::from_millis(50),
        ..net::Limits::default()
    };
    let e = net::receive(
        &dst,
        &header("mtty-2"),
        &listener,
        &test_credentials(),
        &limits,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no source connected"), "{e}");
    assert_eq!(dst.state().unwrap(), MigState::Running);
    assert_eq!(dst.data(), pattern(4096, 9));
}

/// PEM files as libvirt's PKI holds them (made by openssl, as an operator would):
/// they load, and a migration between two ends using them goes through.
#[test]
fn credentials_in_libvirts_pki_files_load_and_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", cmd])
            .current_dir(d)
            .output()
    };
    let made = sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=ca \
                   -keyout cakey.pem -out cacert.pem && \
                   openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=h -keyout key.pem -out req.pem && \
                   printf 'subjectAltName=IP:127.0.0.1\\n' > ext && \
                   openssl x509 -req -in req.pem -CA cacert.pem -CAkey cakey.pem -CAcreateserial -days 1 -extfile ext -out cert.pem");
    match made {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("SKIPPED: openssl (Debian package openssl) could not make test certificates: {other:?}");
            return;
        }
    }
    let files = mediated_dev::migration::tls::Files {
        ca: d.join("cacert.pem"),
        server_cert: d.join("cert.pem"),
        server_key: d.join("key.pem"),
        client_cert: d.join("cert.pem"),
        client_key: d.join("key.pem"),
    };
    let tls = Tls::from_files(&files).unwrap();
    let (src, dst, r) = over_tls(&tls, &tls, |a| a, "mtty-2", net::Limits::default());
    r.unwrap();
    assert_eq!(dst.data(), src.data());
    let missing = mediated_dev::migration::tls::Files {
        ca: d.join("nope.pem"),
        ..files
    };
    let e = Tls::from_files(&missing)
        .err()
        .expect("a missing CA is an error");
    assert!(e.to_string().contains("nope.pem"), "{e}");
}
