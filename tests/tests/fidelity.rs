//! Differential fidelity: the fake host built from a layout captured in the emulated
//! host, put through the same vfctl steps as the real kernel was, must list the same
//! JSON. The committed files in vf-provisioner/layouts/ come from `make regenerate-layouts`;
//! `make real-kernel` runs this test again on the captures of that very boot
//! (VFM_LAYOUT, VFM_REAL_LIST).
//!
//! Values that legitimately differ, and are ignored:
//! - `iommu_group`: numbers are assigned at enumeration and change across boots
//!   (kernel rule 7, docs/kernel.md); group membership is checked by the scenario tests.

use std::path::{Path, PathBuf};

use serde_json::Value;

const IGNORED: &[&str] = &["iommu_group"];

fn input(var: &str, committed: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vf-provisioner/layouts")
            .join(committed)
    })
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in IGNORED {
                m.remove(*k);
            }
            m.values_mut().for_each(strip);
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn vfctl(root: &Path, cfg: &Path, args: &[&str]) -> String {
    let mut argv: Vec<String> = vec![
        "vfctl".into(),
        "--direct".into(),
        "--fake-kernel".into(),
        "--root".into(),
        root.display().to_string(),
    ];
    argv.extend(["--config".into(), cfg.display().to_string()]);
    argv.extend(args.iter().map(|s| s.to_string()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = vfio_manager::cli::main(argv.into_iter().map(Into::into), &mut out, &mut err);
    assert_eq!(
        code,
        std::process::ExitCode::SUCCESS,
        "vfctl {args:?}: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).unwrap()
}

#[test]
fn the_fake_host_lists_what_the_emulated_host_listed() {
    let layout =
        std::fs::read_to_string(input("VFM_LAYOUT", "emulated.json")).expect("captured layout");
    let real = std::fs::read_to_string(input("VFM_REAL_LIST", "emulated-list.json"))
        .expect("captured list");
    let dir = tempfile::tempdir().unwrap();
    let (root, cfg) = (dir.path().join("host"), dir.path().join("config.toml"));
    std::fs::write(&cfg, integration_tests::CONFIG).unwrap();
    vf_provisioner::fake::Layout::from_json(&layout)
        .unwrap()
        .build(&root)
        .unwrap();
    // The steps guest-test.sh took before listing.
    vfctl(&root, &cfg, &["enable", "0000:01:00.0", "--vfs", "3"]);
    vfctl(&root, &cfg, &["bind", "0000:01:10.0"]);
    vfctl(&root, &cfg, &["enable", "0000:02:00.0", "--vfs", "3"]);
    let (mut fake, mut real): (Value, Value) = (
        serde_json::from_str(&vfctl(&root, &cfg, &["list", "-o", "json"])).unwrap(),
        serde_json::from_str(&real).unwrap(),
    );
    strip(&mut fake);
    strip(&mut real);
    if fake != real {
        let (f, r) = (
            serde_json::to_string_pretty(&fake).unwrap(),
            serde_json::to_string_pretty(&real).unwrap(),
        );
        let diff: Vec<String> = f
            .lines()
            .zip(r.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("line {i}: fake {a} | real {b}"))
            .take(20)
            .collect();
        panic!("fake and real lists differ:\n{}", diff.join("\n"));
    }
}
