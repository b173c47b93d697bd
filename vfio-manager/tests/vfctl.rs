//! `vfctl` run in-process against fake hosts: output, JSON shape and exit codes.

use std::path::Path;

struct Run {
    code: u8,
    out: String,
    err: String,
}

fn vfctl(root: &Path, args: &[&str]) -> Run {
    let cfg = root.join("config.toml");
    if !cfg.exists() {
        std::fs::write(&cfg, "manage = [\"8086:10c9\", \"1b36:0010\"]\n").unwrap();
    }
    let mut argv = vec![
        "vfctl".to_string(),
        "--direct".into(),
        "--fake-kernel".into(),
        "--root".into(),
        root.display().to_string(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = vfio_manager::cli::main(argv.into_iter().map(Into::into), &mut out, &mut err);
    // ExitCode has no accessor: compare against the known codes.
    let code = [0u8, 1, 2, 3]
        .into_iter()
        .find(|c| std::process::ExitCode::from(*c) == code)
        .unwrap();
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn fake(layout: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("host");
    let r = vfctl(
        d.path(),
        &["fake-host", root.to_str().unwrap(), "--layout", layout],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    d
}

#[test]
fn list_shows_the_pf_vf_tree_in_table_and_json() {
    let d = fake("demo");
    let root = d.path().join("host");
    assert_eq!(vfctl(&root, &["enable", "0000:3b:00.0"]).code, 0);
    let table = vfctl(&root, &["list"]).out;
    assert!(
        table.lines().next().unwrap().starts_with("ADDRESS"),
        "{table}"
    );
    assert!(table.contains("└ 0000:3b:00.7  1ed5:0324"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&vfctl(&root, &["list", "-o", "json"]).out).unwrap();
    let gpu = json["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == "0000:3b:00.0")
        .unwrap();
    assert_eq!(gpu["kind"], "gpu");
    assert_eq!(gpu["class"], "030200");
    assert_eq!(gpu["vfs"].as_array().unwrap().len(), 4);
    assert_eq!(gpu["vfs"][0]["state"], "unbound");
    assert_eq!(gpu["vendor_name"], "Moore Threads Technology Co.,Ltd");
}

#[test]
fn exit_codes_distinguish_bad_input_refusal_and_success() {
    let d = fake("demo");
    let root = d.path().join("host");
    let bad = vfctl(&root, &["bind", "0000:3b:00.0/../x"]);
    assert_eq!(bad.code, 2);
    assert!(bad.err.contains("invalid PCI address"), "{}", bad.err);
    let refused = vfctl(&root, &["bind", "0000:3b:00.0"]);
    assert_eq!(refused.code, 3);
    assert!(
        refused.err.contains("0000:3b:00.1") && refused.err.contains("--whole-group"),
        "{}",
        refused.err
    );
    assert_eq!(vfctl(&root, &["enable", "01:00.0", "--vfs", "-1"]).code, 2);
    assert_eq!(vfctl(&root, &["enable", "01:00.0", "--vfs", "8"]).code, 3);
    assert_eq!(vfctl(&root, &["nonsense"]).code, 2);
    let ok = vfctl(
        &root,
        &["bind", "0000:3b:00.0", "--whole-group", "-o", "json"],
    );
    assert_eq!(ok.code, 0, "{}", ok.err);
    let moved: serde_json::Value = serde_json::from_str(&ok.out).unwrap();
    assert_eq!(moved["moved"][1]["from"], "snd_hda_intel");
}

#[test]
fn a_root_that_is_not_sysfs_is_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let r = vfctl(d.path(), &["list"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("is not a sysfs root"), "{}", r.err);
}

#[test]
fn a_broken_config_file_is_bad_input_and_names_the_file() {
    let d = fake("demo");
    let root = d.path().join("host");
    std::fs::write(root.join("config.toml"), "manage = [\"not-an-id\"]\n").unwrap();
    let r = vfctl(&root, &["list"]);
    assert_eq!(r.code, 2);
    assert!(
        r.err.contains("config.toml") && r.err.contains("not-an-id"),
        "{}",
        r.err
    );
}

#[test]
fn check_fails_on_a_host_without_iommu() {
    let d = fake("emulated");
    let root = d.path().join("host");
    std::fs::remove_dir_all(root.join("sys/kernel/iommu_groups")).unwrap();
    std::fs::create_dir(root.join("sys/kernel/iommu_groups")).unwrap();
    let r = vfctl(&root, &["check"]);
    assert_eq!(r.code, 1);
    assert!(r.out.contains("intel_iommu=on"), "{}", r.out);
}

#[test]
fn help_says_what_each_command_changes() {
    let d = tempfile::tempdir().unwrap();
    for cmd in ["enable", "disable", "bind", "unbind", "reset"] {
        let r = vfctl(d.path(), &[cmd, "--help"]);
        assert_eq!(r.code, 0);
        assert!(r.out.contains("Changes"), "{cmd}: {}", r.out);
    }
}

#[test]
fn generates_a_man_page_and_completions() {
    let d = tempfile::tempdir().unwrap();
    let man = vfctl(d.path(), &["generate", "man"]);
    assert_eq!(man.code, 0);
    assert!(
        man.out.contains(".TH vfctl") && man.out.contains("enable"),
        "{}",
        &man.out[..200.min(man.out.len())]
    );
    let bash = vfctl(d.path(), &["generate", "bash"]);
    assert!(bash.out.contains("complete") && bash.out.contains("whole-group"));
    assert_eq!(vfctl(d.path(), &["generate", "tcsh"]).code, 2);
}
