//! The policy gate crossed with every entry point that changes the host: for each
//! refusal reason, a host in that state, and every entry point tried on it. Each
//! try must be refused for that reason (a pool request: find nothing) and leave
//! the host, the leases and the quarantine exactly as they were.
//!
//! The daemon's entry points are `Core`'s methods, which the D-Bus layer and the
//! hook call one to one (built here without a bus); `vfctl --direct` is the
//! provisioner with the configuration and no table. Runs on the fake host (plain
//! `cargo test`) and on the real kernel in the emulated host (`VFM_REAL_KERNEL=1`,
//! serially), like the other scenarios.

use std::fmt::Write as _;

use integration_tests::*;
use mediated_dev::host::read_mdev;
use vf_provisioner::{DeviceConfig, DeviceFilter, Host, Provisioner};
use vfio_manager::api::{ApiError, Request};
use vfio_manager::config::Config;
use vfio_manager::daemon::audit::Audit;
use vfio_manager::daemon::core::{Core, LeaseRef};

/// Why the gate refuses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Why {
    Excluded,
    NotManaged,
    Leased,
    Quarantined,
    SharedGroup,
    HeldOpen,
    HostCritical,
}

/// Where a change enters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    /// `Provision` from the pool (`vfctl provision`).
    LeasePool,
    /// `Provision` naming the device (the libvirt hook, `vfctl provision --device`).
    LeaseNamed,
    Bind,
    Unbind,
    EnableVfs,
    DisableVfs,
    Release,
    MdevRemove,
    Migrate,
    DirectBind,
    DirectUnbind,
    DirectDisable,
}

use Entry::*;
use Why::*;

/// Every entry point the configuration's verdict (excluded, not managed) stops.
const CONFIG_ENTRIES: &[Entry] = &[
    LeasePool,
    LeaseNamed,
    Bind,
    Unbind,
    EnableVfs,
    DisableVfs,
    DirectBind,
    DirectUnbind,
    DirectDisable,
];

/// Every pair that is a refusal, with what the refusal must say. A pair not here
/// is not one the policy refuses (an unbind of a quarantined device is how an
/// operator frees it; direct mode has no leases to know).
const TABLE: &[(Why, &[Entry], &str)] = &[
    (Excluded, CONFIG_ENTRIES, "excluded"),
    (NotManaged, CONFIG_ENTRIES, "not managed"),
    (
        Leased,
        &[
            LeasePool, LeaseNamed, Bind, Unbind, EnableVfs, DisableVfs, MdevRemove,
        ],
        "leased to VM",
    ),
    (
        Quarantined,
        &[LeasePool, LeaseNamed, Bind, Migrate],
        "quarantined",
    ),
    (SharedGroup, &[LeaseNamed, Bind, DirectBind], "IOMMU group"),
    (
        HeldOpen,
        &[
            LeaseNamed,
            Unbind,
            DisableVfs,
            Release,
            MdevRemove,
            Migrate,
            DirectUnbind,
            DirectDisable,
        ],
        "held open",
    ),
    (
        HostCritical,
        &[LeaseNamed, Bind, DirectBind],
        "the host needs",
    ),
];

/// The igb PF and the multifunction slot; no idle PF that a short pool request
/// would enable VFs on.
const MANAGE: &str = "manage = [\"8086:10c9\", \"0000:03:00.0\"]\n";

/// A host in the state that gives `why`, and the devices the entries are tried on.
struct Case<'e> {
    env: &'e Env,
    core: Core,
    direct: Provisioner,
    /// The function the entries name (a VF, or a PF for group and host reasons).
    target: String,
    /// A lease that `Release` tries to end, if this reason has one.
    lease: Option<String>,
    /// An mdev the mdev entries try.
    mdev: Option<String>,
    _state: tempfile::TempDir,
    _hold: Vec<Hold>,
}

fn core_with(env: &Env, config: &str, state: &tempfile::TempDir) -> Core {
    let text = format!(
        "{config}[daemon]\nstate_dir = \"{}\"\n",
        state.path().display()
    );
    let config = Config::parse(&text, std::path::Path::new("test")).expect("config");
    Core::open(env.sys(), config, Audit::open(None).unwrap()).expect("core")
}

fn direct(env: &Env, config: &str) -> Provisioner {
    let cfg = DeviceConfig::parse(config, std::path::Path::new("test")).expect("config");
    Provisioner::new(env.sys(), DeviceFilter::new(&cfg))
}

fn named(vm: &str, device: &str, adopt: bool) -> Request {
    Request {
        request_id: format!("{vm}-{device}"),
        vm_name: vm.into(),
        profile: "vf".into(),
        count: 1,
        devices: vec![device.into()],
        adopt,
        ..Request::default()
    }
}

fn setup(env: &Env, why: Why) -> Case<'_> {
    let state = tempfile::tempdir().unwrap();
    let plain = env.provisioner();
    let mut config = MANAGE.to_string();
    let target;
    let (mut lease, mut mdev, mut hold) = (None, None, Vec::new());
    // One VF: a pool request then has no other to take.
    let vf = || plain.enable_vfs(&addr(IGB), Some(1)).unwrap()[0].to_string();
    match why {
        Excluded => {
            target = vf();
            config.push_str(&format!("exclude = [\"{IGB}\"]\n"));
        }
        NotManaged => {
            target = vf();
            config = "manage = [\"0000:03:00.0\"]\n".into();
        }
        Quarantined => {
            // On vfio-pci with our override and no lease: a lease the table lost.
            target = vf();
            plain.bind_vfio(&addr(&target), false).unwrap();
            // And an mdev nobody defined or leased.
            let m = mediated_dev::Mediator::new(env.sys());
            let made = m.create(&"mtty".parse().unwrap(), &"mtty-1".parse().unwrap(), None);
            mdev = Some(made.unwrap().uuid.to_string());
        }
        SharedGroup => target = MF0.into(),
        HostCritical => {
            target = IGB.into();
            env.set_link(IGB, true);
        }
        Leased | HeldOpen => target = vf(),
    }
    let core = core_with(env, &config, &state);
    core.restore().recover().expect("recover");
    if why == Quarantined {
        let orphans = core.restore().orphans().unwrap();
        for name in [&target, mdev.as_ref().unwrap()] {
            assert!(
                orphans.iter().any(|o| &o.0 == name),
                "setup: {name} is quarantined"
            );
        }
    }
    if why == Leased || why == HeldOpen {
        let mtty = Request {
            request_id: "holder-mdev".into(),
            vm_name: "holder".into(),
            profile: "mtty-2".into(),
            count: 1,
            ..Request::default()
        };
        let m = core.pool().provision(mtty, 0).unwrap().0;
        mdev = Some(m.devices[0].address.clone());
        lease = Some(m.id);
    }
    if why == Leased {
        core.pool()
            .provision(named("holder", &target, false), 0)
            .unwrap();
    }
    if why == HeldOpen {
        // Held open by a VMM: an unleased VF on vfio-pci, the leased mdev, and an
        // unleased mdev (which the mdev entries try).
        core.direct().bind(&target, false, 0).unwrap();
        let leased = mdev.replace(
            core.mediated()
                .create_mdev("mtty", "mtty-1", "", "", 0)
                .unwrap()
                .uuid,
        );
        let group = |u: &str| {
            read_mdev(&env.sys(), &u.parse().unwrap())
                .unwrap()
                .iommu_group
        };
        let groups = [
            env.func(&target).iommu_group,
            group(&leased.unwrap()),
            group(mdev.as_deref().unwrap()),
        ];
        hold = groups.into_iter().map(|g| env.hold(g.unwrap())).collect();
    }
    Case {
        env,
        direct: direct(env, &config),
        core,
        target,
        lease,
        mdev,
        _state: state,
        _hold: hold,
    }
}

/// What an entry did: its error's kind and text, or "ok".
fn attempt(c: &Case<'_>, entry: Entry) -> (String, String) {
    let t = c.target.as_str();
    let a = addr(t);
    let pf = c.env.func(t).physfn.unwrap_or(a).to_string();
    let api = |r: Result<(), ApiError>| match r {
        Ok(()) => ("ok".to_string(), String::new()),
        Err(e) => (kind(&e).to_string(), e.to_string()),
    };
    let vfp = |r: vf_provisioner::Result<()>| match r {
        Ok(()) => ("ok".to_string(), String::new()),
        Err(e) => (format!("{:?}", e.kind()), e.to_string()),
    };
    match entry {
        LeasePool => api(c
            .core
            .pool()
            .provision(
                Request {
                    request_id: "pool".into(),
                    vm_name: "pool".into(),
                    profile: "vf".into(),
                    count: 1,
                    ..Request::default()
                },
                0,
            )
            .map(drop)),
        LeaseNamed => api(c
            .core
            .pool()
            .provision(named("named", t, false), 0)
            .map(drop)),
        Bind => api(c.core.direct().bind(t, false, 0).map(drop)),
        Unbind => api(c.core.direct().unbind(t, false, 0).map(drop)),
        EnableVfs => api(c.core.direct().enable_vfs(&pf, Some(3), 0).map(drop)),
        DisableVfs => api(c.core.direct().disable_vfs(&pf, 0).map(drop)),
        Release => {
            let id = c.lease.as_deref().expect("a lease").parse().unwrap();
            api(c.core.pool().release(&LeaseRef::Lease(id), 0).map(drop))
        }
        MdevRemove => api(c
            .core
            .mediated()
            .remove_mdev(c.mdev.as_deref().unwrap(), false, 0)),
        Migrate => api(c
            .core
            .migration()
            .migration_check(c.mdev.as_deref().unwrap())
            .map(drop)),
        DirectBind => vfp(c.direct.bind_vfio(&a, false).map(drop)),
        DirectUnbind => vfp(c.direct.unbind(&a, false, None).map(drop)),
        DirectDisable => vfp(c.direct.disable_vfs(&addr(&pf))),
    }
}

fn kind(e: &ApiError) -> &'static str {
    match e {
        ApiError::Refused(_) => "Refused",
        ApiError::NoDevice(_) => "NoDevice",
        ApiError::BadInput(_) => "BadInput",
        ApiError::NotFound(_) => "NotFound",
        ApiError::PermissionDenied(_) => "PermissionDenied",
        ApiError::Failed(_) => "Failed",
        ApiError::ZBus(_) => "ZBus",
    }
}

/// Everything a refused entry must leave as it was.
fn snapshot(c: &Case<'_>) -> String {
    let host = Host::scan(&c.env.sys());
    let mut s = String::new();
    for f in host.functions.values() {
        let vfs = f.sriov.as_ref().map(|x| x.num_vfs);
        let _ = writeln!(
            s,
            "{} {:?} {:?} {vfs:?}",
            f.address, f.driver, f.driver_override
        );
    }
    let _ = writeln!(s, "leases {:?}", c.core.leases().unwrap());
    let _ = writeln!(s, "orphans {:?}", c.core.restore().orphans().unwrap());
    let mdevs: Vec<String> = c
        .core
        .mediated()
        .mdevs()
        .unwrap()
        .into_iter()
        .map(|m| m.uuid)
        .collect();
    let _ = writeln!(s, "mdevs {mdevs:?}");
    s
}

fn cleanup(c: Case<'_>) {
    let Case {
        env, core, _hold, ..
    } = c;
    drop(_hold);
    for l in core.leases().unwrap() {
        let id = l.id.parse().unwrap();
        core.pool().release(&LeaseRef::Lease(id), 0).unwrap();
    }
    for m in core.mediated().mdevs().unwrap() {
        let _ = core.mediated().remove_mdev(&m.uuid, true, 0);
    }
    env.set_link(IGB, false);
    drop(Restore(env));
}

#[test]
fn every_entry_point_refuses_every_reason_and_changes_nothing() {
    let env = Env::new();
    let _r = Restore(&env);
    let mut report = String::new();
    for (why, entries, says) in TABLE {
        let case = setup(&env, *why);
        let before = snapshot(&case);
        for entry in *entries {
            let (kind, text) = attempt(&case, *entry);
            // From the pool an unfit device is skipped: the answer is that none is free.
            let want = if *entry == LeasePool {
                "NoDevice"
            } else {
                "Refused"
            };
            assert_eq!(kind, want, "{why:?} x {entry:?}: {text}");
            if *entry != LeasePool {
                assert!(text.contains(says), "{why:?} x {entry:?}: {text}");
            }
            assert_eq!(
                snapshot(&case),
                before,
                "{why:?} x {entry:?} changed the host"
            );
            let _ = writeln!(report, "{why:?} x {entry:?}: {kind}");
        }
        cleanup(case);
    }
    eprintln!("{report}");
}

/// The mediated entry points on PCI parents and vGPU VFs, which the emulated host
/// does not have (its only mdev parent is the virtual mtty): on the fake NVIDIA
/// hosts only. Each reason crossed with mdev create (the daemon and `vfctl
/// --direct`), a lease of a mediated profile, and a vGPU type (a lease and `vfctl
/// --direct vgpu set`).
#[test]
fn mediated_entry_points_on_pci_functions_refuse_every_reason() {
    if std::env::var_os("VFM_REAL_KERNEL").is_some() {
        eprintln!("SKIPPED: the emulated host has no PCI mdev parent nor vGPU VF");
        return;
    }
    let mdev_parent = "0000:af:00.0";
    let t4 = vf_provisioner::layouts::nvidia_mdev();
    struct Try {
        why: &'static str,
        config: String,
        boot_vga: bool,
        says: &'static str,
    }
    let tries = [
        Try {
            why: "excluded parent",
            config: format!("exclude = [\"{mdev_parent}\"]\n"),
            boot_vga: false,
            says: "excluded",
        },
        Try {
            why: "the host's display",
            config: String::new(),
            boot_vga: true,
            says: "boot display",
        },
    ];
    for t in &tries {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = t4.clone();
        if t.boot_vga {
            // A VGA-class GPU (only those have `boot_vga`) that the firmware booted on.
            let gpu = layout
                .functions
                .iter_mut()
                .find(|f| f.address == addr(mdev_parent));
            let gpu = gpu.unwrap();
            (gpu.class, gpu.boot_vga) = ("030000".into(), true);
        }
        layout.build(dir.path()).unwrap();
        let core = fake_core(dir.path(), &t.config);
        let e = core
            .mediated()
            .create_mdev(mdev_parent, "nvidia-222", "", "", 0)
            .unwrap_err();
        assert!(
            matches!(e, ApiError::Refused(_)) && e.to_string().contains(t.says),
            "{}: {e}",
            t.why
        );
        let e = core
            .pool()
            .provision(mediated_request("nvidia-222"), 0)
            .unwrap_err();
        assert!(
            matches!(e, ApiError::BadInput(_) | ApiError::NoDevice(_)),
            "{}: {e}",
            t.why
        );
        let (code, err) = vfctl_direct(
            dir.path(),
            &t.config,
            &[
                "mdev",
                "create",
                "--parent",
                mdev_parent,
                "--type",
                "nvidia-222",
            ],
        );
        assert!(code != 0 && err.contains(t.says), "{}: vfctl: {err}", t.why);
        assert!(
            core.mediated().mdevs().unwrap().is_empty(),
            "{}: no mdev made",
            t.why
        );
    }
    // vGPU types per VF: an excluded PF's VFs, and a VF leased whole.
    let a100 = vf_provisioner::layouts::nvidia_dc();
    let pf = "0000:ca:00.0";
    for (why, exclude, says) in [
        ("excluded PF", true, "excluded"),
        ("VF leased whole", false, "leased to VM"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        a100.build(dir.path()).unwrap();
        let plain = Provisioner::new(
            vf_provisioner::Sysfs::open_fake(dir.path()).unwrap(),
            DeviceFilter::default(),
        );
        let vfs = plain.enable_vfs(&addr(pf), Some(1)).unwrap();
        let vf = vfs[0].to_string();
        let config = if exclude {
            format!("exclude = [\"{pf}\"]\n")
        } else {
            String::new()
        };
        let core = fake_core(dir.path(), &config);
        if !exclude {
            core.pool()
                .provision(named("whole", &vf, false), 0)
                .unwrap();
        }
        let e = core
            .pool()
            .provision(mediated_request("NVIDIA A100D-20C"), 0)
            .unwrap_err();
        assert!(
            matches!(e, ApiError::BadInput(_) | ApiError::NoDevice(_)),
            "{why}: {e}"
        );
        let (code, err) = vfctl_direct(
            dir.path(),
            &config,
            &["vgpu", "set", &vf, "NVIDIA A100D-20C"],
        );
        if exclude {
            // Direct mode knows no leases; the configuration it does know.
            assert!(code != 0 && err.contains(says), "{why}: vfctl: {err}");
            let (code, err) = vfctl_direct(dir.path(), &config, &["vgpu", "clear", &vf]);
            assert!(
                code != 0 && err.contains(says),
                "{why}: vfctl vgpu clear: {err}"
            );
        }
        let slots =
            mediated_dev::Mediator::new(vf_provisioner::Sysfs::open_fake(dir.path()).unwrap())
                .scan()
                .vgpus;
        let typed = slots.iter().filter(|s| s.current.is_some()).count();
        assert_eq!(typed, usize::from(!exclude && code == 0), "{why}: {says}");
    }
}

fn fake_core(root: &std::path::Path, config: &str) -> Core {
    let state = root.join("state");
    let text = format!("{config}[daemon]\nstate_dir = \"{}\"\n", state.display());
    let config = Config::parse(&text, std::path::Path::new("test")).expect("config");
    let sys = vf_provisioner::Sysfs::open_fake(root).unwrap();
    let core = Core::open(sys, config, Audit::open(None).unwrap()).expect("core");
    core.restore().recover().expect("recover");
    core
}

fn mediated_request(profile: &str) -> Request {
    Request {
        request_id: format!("m-{profile}"),
        vm_name: "m".into(),
        profile: profile.into(),
        count: 1,
        ..Request::default()
    }
}

/// `vfctl --direct` in this process: its exit code and what it wrote to stderr.
fn vfctl_direct(root: &std::path::Path, config: &str, args: &[&str]) -> (i32, String) {
    let cfg = root.join("vfctl.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut argv: Vec<std::ffi::OsString> = ["vfctl", "--direct", "--fake-kernel", "--root"]
        .iter()
        .map(Into::into)
        .collect();
    argv.push(root.into());
    argv.extend(["--config".into(), cfg.into_os_string()]);
    argv.extend(args.iter().map(Into::into));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = vfio_manager::cli::main(argv, &mut out, &mut err);
    let code = if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    };
    (code, String::from_utf8_lossy(&err).into_owned())
}

/// A function that shares its IOMMU group is leased only with every other member
/// (a GPU with its audio function; here the emulated host's two-function slot):
/// named alone it is refused, naming the other; named together both go to
/// vfio-pci, and both come back to their drivers at release.
#[test]
fn a_whole_group_is_leased_and_returned_as_one_unit() {
    let env = Env::new();
    let _r = Restore(&env);
    let state = tempfile::tempdir().unwrap();
    let config = format!("manage = [\"{MF0}\", \"{MF1}\"]\n");
    let core = core_with(&env, &config, &state);
    core.restore().recover().unwrap();
    let before = (env.driver(MF0), env.driver(MF1));
    let e = core
        .pool()
        .provision(named("alone", MF0, false), 0)
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Refused(_)) && e.to_string().contains(MF1),
        "{e}"
    );
    assert_eq!(
        (env.driver(MF0), env.driver(MF1)),
        before,
        "refused: unchanged"
    );
    let both = Request {
        devices: vec![MF0.into(), MF1.into()],
        count: 2,
        ..named("whole", MF0, false)
    };
    let (lease, _) = core.pool().provision(both, 0).unwrap();
    assert_eq!(lease.devices.len(), 2);
    for a in [MF0, MF1] {
        assert_eq!(env.driver(a).as_deref(), Some("vfio-pci"), "{a}");
    }
    let id = LeaseRef::Lease(lease.id.parse().unwrap());
    core.pool().release(&id, 0).unwrap();
    assert_eq!(
        (env.driver(MF0), env.driver(MF1)),
        before,
        "returned together"
    );
}
