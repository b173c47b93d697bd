//! The vfio-manager daemon; everything lives in `vfio_manager::daemon`.

fn main() -> std::process::ExitCode {
    vfio_manager::daemon::main(std::env::args_os())
}
