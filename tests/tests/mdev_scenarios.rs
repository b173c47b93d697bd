//! The mediated path's scenarios, run twice like `kernel_scenarios`: on the fake
//! host (plain `cargo test`) and on the real kernel's mtty sample inside the
//! emulated host (`VFM_REAL_KERNEL=1`). The capacity numbers asserted here are the
//! fake's model; the real run is what proves the model right.

use std::io::ErrorKind;

use integration_tests::*;
use mediated_dev::{plan, Definition, Kind, Mediator, Start, Store, Want};

const MTTY1: &str = "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1";

/// Removes every mtty mdev and definition when dropped (the real kernel is shared).
struct Clean<'a>(&'a Env);

impl Drop for Clean<'_> {
    fn drop(&mut self) {
        let m = Mediator::new(self.0.sys());
        for d in m.scan().mdevs {
            let _ = m.remove(&d.uuid);
        }
        let _ = std::fs::remove_dir_all(self.0.root.join("etc/mdevctl.d/mtty"));
    }
}

fn available(m: &Mediator, ty: &str) -> u32 {
    m.scan()
        .parent("mtty")
        .unwrap()
        .find_type(ty)
        .unwrap()
        .available_instances
}

fn raw(env: &Env, rel: &str, data: &str) -> std::io::Result<()> {
    env.sys().write_attr(&env.root.join(rel), data)
}

#[test]
fn create_and_remove_take_and_return_mtty_capacity() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    assert_eq!((available(&m, "mtty-1"), available(&m, "mtty-2")), (24, 12));
    let d = m
        .create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap();
    assert_eq!(d.driver.as_deref(), Some("mtty"));
    let g = d.iommu_group.expect("an mdev has its own group");
    assert!(env.root.join("dev/vfio").join(g.to_string()).exists());
    assert_eq!(
        (available(&m, "mtty-1"), available(&m, "mtty-2")),
        (22, 11),
        "two ports taken"
    );
    m.remove(&d.uuid).unwrap();
    assert_eq!((available(&m, "mtty-1"), available(&m, "mtty-2")), (24, 12));
}

#[test]
fn a_full_type_is_refused_and_a_raw_create_past_capacity_fails_and_leaves_nothing() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    for _ in 0..12 {
        m.create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
            .unwrap();
    }
    let e = m
        .create(&"mtty".parse().unwrap(), &"mtty-1".parse().unwrap(), None)
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    assert_eq!(m.scan().mdevs.len(), 12, "nothing created");
    // kernel rule 11, docs/kernel.md, as 6.12 does it: mtty's probe fails with ENOSPC, the
    // kernel deletes the device and the write fails.
    let u = "83b8f4f2-509f-382f-3c1e-e6bfe0fa0bad";
    let e = raw(&env, &format!("{MTTY1}/create"), u).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(!m.scan().mdevs.iter().any(|d| d.uuid.to_string() == u));
}

#[test]
fn a_uuid_in_use_is_refused_naming_its_mdev_and_an_unknown_one_is_not_found() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    let d = m
        .create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap();
    let before = available(&m, "mtty-1");
    let e = m
        .create(
            &"mtty".parse().unwrap(),
            &"mtty-1".parse().unwrap(),
            Some(d.uuid),
        )
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    assert!(
        e.to_string()
            .contains("in use by an mdev of type mtty-2 on mtty"),
        "{e}"
    );
    assert_eq!(available(&m, "mtty-1"), before, "nothing taken");
    assert_eq!(m.scan().mdevs.len(), 1);
    m.remove(&d.uuid).unwrap();
    let e = m.remove(&d.uuid).unwrap_err();
    assert!(
        matches!(e, mediated_dev::Error::NoMdev(u) if u == d.uuid),
        "{e}"
    );
}

#[test]
fn an_unbound_mdev_cannot_be_bound_again() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    let d = m
        .create(&"mtty".parse().unwrap(), &"mtty-1".parse().unwrap(), None)
        .unwrap();
    raw(
        &env,
        "sys/bus/mdev/drivers/mtty/unbind",
        &d.uuid.to_string(),
    )
    .unwrap();
    let e = raw(&env, "sys/bus/mdev/drivers/mtty/bind", &d.uuid.to_string()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
}

#[test]
fn an_mdev_a_vmm_holds_is_not_removed() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    let d = m
        .create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap();
    {
        let _held = env.hold(d.iommu_group.unwrap());
        let e = m.remove(&d.uuid).unwrap_err();
        assert_eq!(e.kind(), Kind::Refused);
        assert!(e.to_string().contains("is open by"), "{e}");
    }
    m.remove(&d.uuid).unwrap();
}

#[test]
fn auto_definitions_start_with_their_uuid_and_type() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    let store = Store::new(&env.root);
    let def: Definition = Definition {
        uuid: "83b8f4f2-509f-382f-3c1e-e6bfe0fa0042".parse().unwrap(),
        parent: "mtty".parse().unwrap(),
        config: serde_json::from_str(r#"{"mdev_type": "mtty-2", "start": "auto", "attrs": []}"#)
            .unwrap(),
    };
    assert_eq!(def.config.start, Start::Auto);
    store.write(&def).unwrap();
    let started = m.start_auto(&store, &|_| None);
    assert!(started.iter().all(|(_, r)| r.is_ok()), "{started:?}");
    let active = m.scan().mdevs;
    assert!(active
        .iter()
        .any(|d| d.uuid == def.uuid && d.type_id == "mtty-2"));
}

#[test]
fn the_plan_agrees_with_the_kernel_after_it_is_carried_out() {
    let env = Env::new();
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    let wants: Vec<Want> = ["mtty-2:3", "mtty-1:2"]
        .iter()
        .map(|w| w.parse().unwrap())
        .collect();
    let p = plan(&m.scan(), &wants);
    assert!(p.fits());
    for pl in &p.placements {
        let mediated_dev::plan::Target::Mdev { parent, type_id } = &pl.target else {
            panic!("mtty is an mdev parent")
        };
        m.create(parent, type_id, None).unwrap();
    }
    assert_eq!(available(&m, "mtty-1"), 16, "24 - 3x2 - 2");
    let over: Vec<Want> = vec!["mtty-2:9".parse().unwrap()];
    assert_eq!(
        plan(&m.scan(), &over).shortfalls[0].missing,
        1,
        "8 dual ports left"
    );
    // A raw remove of an mdev whose group nobody holds does not block.
    let d = m.scan().mdevs[0].clone();
    raw(
        &env,
        &format!("sys/bus/mdev/devices/{}/remove", d.uuid),
        "1",
    )
    .map_err(|e| assert_ne!(e.kind(), ErrorKind::WouldBlock))
    .unwrap();
}

/// mtty's BAR0/BAR1 hold one UART each; the scratch register (offset 7) keeps
/// what is written, and is part of the state mtty migrates.
const SCR: u64 = 7;

fn scratch(dev: &mediated_dev::migration::VfioMigration, port: u32) -> u8 {
    let mut b = [0u8; 1];
    dev.region_read(port, &mut b, SCR);
    b[0]
}

#[test]
fn mtty_state_moves_between_two_mdevs_over_tcp_and_faults_leave_both_running() {
    use mediated_dev::migration::{self as mig, net, MigState, MigrationDevice, VfioMigration};
    let env = Env::new();
    if !env.real {
        eprintln!(
            "skipped on the fake host: needs the real kernel's VFIO (runs in the emulated host; \
             the same save/load/TCP code runs on in-memory devices in mediated-dev/tests/migration.rs)"
        );
        return;
    }
    let _c = Clean(&env);
    let m = Mediator::new(env.sys());
    let open = |d: &mediated_dev::Mdev| {
        VfioMigration::open(
            &env.root.join(d.sysfs_path.strip_prefix("/").unwrap()),
            &d.uuid.to_string(),
        )
        .unwrap()
    };
    let (a, b, c) = (
        m.create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
            .unwrap(),
        m.create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
            .unwrap(),
        m.create(&"mtty".parse().unwrap(), &"mtty-1".parse().unwrap(), None)
            .unwrap(),
    );
    let (src, dst, other) = (open(&a), open(&b), open(&c));
    assert_eq!(mig::check(&src).unwrap() & 1, 1, "mtty offers STOP_COPY");
    src.region_write(0, &[0x5a], SCR);
    src.region_write(1, &[0xa5], SCR);
    dst.region_write(0, &[0x11], SCR);
    let header = mig::mdev_header(&env.sys(), &a);
    let want = mig::mdev_header(&env.sys(), &b);
    // The stream's length, to cut and corrupt it in the middle.
    let mut whole = Vec::new();
    drop(mig::save(&src, &header, &mut whole).unwrap());
    assert_eq!(src.state().unwrap(), MigState::Running);

    let tls = mediated_dev::migration::tls::test_credentials();
    let run = |to: &dyn MigrationDevice, want: &mig::Header, limit: usize, flip: Option<usize>| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = net::fault_proxy(l.local_addr().unwrap(), limit, flip).unwrap();
        std::thread::scope(|s| {
            let r = s.spawn(|| net::receive(to, want, &l, &tls, &net::Limits::default()));
            let sent = net::send(&src, &header, &target.to_string(), &tls);
            (sent, r.join().unwrap())
        })
    };
    // Offsets into the TLS connection: mtty's state is ~100 bytes, so these land in
    // the handshake (the unit tests cut and corrupt a 2 MiB state mid-stream).
    let faults = [
        ("connection cut", whole.len() / 2, None),
        ("corrupted byte", usize::MAX, Some(whole.len() - 30)),
    ];
    for (name, limit, flip) in faults {
        let (sent, got) = run(&dst, &want, limit, flip);
        assert!(sent.is_err() && got.is_err(), "{name}");
        assert_eq!(
            src.state().unwrap(),
            MigState::Running,
            "{name}: source runs"
        );
        assert_eq!(
            dst.state().unwrap(),
            MigState::Running,
            "{name}: destination reset, not RESUMING"
        );
        assert_eq!(
            scratch(&dst, 0),
            0x11,
            "{name}: destination keeps its own state"
        );
    }
    let want_other = mig::mdev_header(&env.sys(), &c);
    let (sent, got) = run(&other, &want_other, usize::MAX, None);
    assert!(
        got.unwrap_err().to_string().contains("incompatible"),
        "mtty-2 state into mtty-1"
    );
    assert!(sent.is_err());
    assert_eq!(other.state().unwrap(), MigState::Running);
    assert_eq!(src.state().unwrap(), MigState::Running);

    let (sent, got) = run(&dst, &want, usize::MAX, None);
    let (tracker, stats) = sent.unwrap();
    got.unwrap();
    assert_eq!(
        src.state().unwrap(),
        MigState::Stop,
        "{}",
        tracker.describe()
    );
    assert_eq!(
        (scratch(&dst, 0), scratch(&dst, 1)),
        (0x5a, 0xa5),
        "state written into one mdev read from the other"
    );
    eprintln!(
        "mtty migration: {} bytes, stopped for {:?}, {}",
        stats.bytes,
        stats.stopped_for,
        tracker.describe()
    );
    // Leave the source RUNNING before it is closed and removed (kernel rule 8, docs/kernel.md).
    src.set_state(MigState::Running).unwrap();
}
