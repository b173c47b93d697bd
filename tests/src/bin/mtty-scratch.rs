//! For the real-kernel tier: reads or writes the scratch register (offset 7) of an
//! mtty mdev's first UART through VFIO, the state that migration must carry.
//!
//! `mtty-scratch UUID` prints it (hex); `mtty-scratch UUID VALUE` writes VALUE (hex).
//! mtty keeps the register across closes of the device, so the value written here
//! is what the daemon later finds when it migrates the device.

use std::path::Path;
use std::process::ExitCode;

use mediated_dev::migration::VfioMigration;

const SCR: u64 = 7;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(uuid) = args.first() else {
        eprintln!("usage: mtty-scratch UUID [VALUE]");
        return ExitCode::from(2);
    };
    let path = Path::new("/sys/bus/mdev/devices").join(uuid);
    let dev = match VfioMigration::open(&path, uuid) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("mtty-scratch: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.get(1).map(|v| u8::from_str_radix(v, 16)) {
        Some(Ok(v)) => dev.region_write(0, &[v], SCR),
        Some(Err(e)) => {
            eprintln!("mtty-scratch: VALUE: {e}");
            return ExitCode::from(2);
        }
        None => {
            let mut b = [0u8; 1];
            dev.region_read(0, &mut b, SCR);
            println!("{:02x}", b[0]);
        }
    }
    ExitCode::SUCCESS
}
