//! `make bench`: `vfctl list --output json` beside the bare reader of the same sysfs
//! files (the floor), on a generated fake host, in one run. Prints medians and the
//! ratio. Usage: bench-list [PFS] [VFS] [RUNS]   (defaults 64 64 15)

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn time(cmd: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{} failed: {}",
        cmd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let (pfs, vfs, runs) = (
        *args.first().unwrap_or(&64),
        *args.get(1).unwrap_or(&64),
        *args.get(2).unwrap_or(&15),
    );
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let (vfctl, bare) = (bin.join("vfctl"), bin.join("bare-list"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let t = Instant::now();
    vf_provisioner::layouts::large(pfs, vfs)
        .build(&root)
        .unwrap();
    let functions = std::fs::read_dir(root.join("sys/bus/pci/devices"))
        .unwrap()
        .count();
    println!(
        "fake host: {pfs} PFs x {vfs} VFs = {functions} functions, built in {:.1?}",
        t.elapsed()
    );
    let root_s = root.to_str().unwrap();
    let vfctl_args = [
        "--direct",
        "--fake-kernel",
        "--root",
        root_s,
        "--config",
        "/nonexistent",
        "list",
        "--output",
        "json",
    ];
    // Warm the page cache and dentries for both.
    time(&vfctl, &vfctl_args);
    time(&bare, &[root_s]);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        a.push(time(&vfctl, &vfctl_args));
        b.push(time(&bare, &[root_s]));
    }
    let (ma, mb) = (median(a), median(b));
    println!("{:<34} {:>10.2?}", "bare sysfs reader (floor)", mb);
    println!("{:<34} {:>10.2?}", "vfctl list --output json", ma);
    println!(
        "ratio vfctl/floor: {:.2}x (target <= 1.5x), median of {runs} runs",
        ma.as_secs_f64() / mb.as_secs_f64()
    );
}
