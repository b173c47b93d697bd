//! `vfio-manager-hook`: installed as libvirt's `/etc/libvirt/hooks/qemu` (or linked
//! from it). Arguments: DOMAIN OPERATION SUB-OPERATION EXTRA; domain XML on stdin.
//! On failure it prints one line, which libvirt shows to the user, and exits 1.

use std::io::{Read, Write};
use std::process::ExitCode;

use vfio_manager_api::client::Client;

/// The largest domain XML read.
const MAX_XML: u64 = 16 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(op), Some(sub)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: vfio-manager-hook DOMAIN OPERATION SUB-OPERATION [EXTRA] < domain.xml (run by libvirt)");
        return ExitCode::from(2);
    };
    // libvirt's domain XML is kilobytes; a bound keeps a runaway writer from
    // filling memory (one byte more than the bound tells it was exceeded).
    let mut xml = String::new();
    let read = std::io::stdin().take(MAX_XML + 1).read_to_string(&mut xml);
    if let Err(e) = read {
        eprintln!("vfio-manager: cannot read the domain XML on stdin: {e}");
        return ExitCode::FAILURE;
    }
    if xml.len() as u64 > MAX_XML {
        eprintln!(
            "vfio-manager: the domain XML on stdin is over {} MiB; refused",
            MAX_XML >> 20
        );
        return ExitCode::FAILURE;
    }
    match libvirt_hooks::hook::run(op, sub, &xml, Client::connect) {
        Ok(out) => {
            if let Some(xml) = out {
                let _ = std::io::stdout().write_all(xml.as_bytes());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vfio-manager: {op} {sub}: {e}");
            ExitCode::FAILURE
        }
    }
}
