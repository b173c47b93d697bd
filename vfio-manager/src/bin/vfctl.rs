//! `vfctl`: thin entry point; everything lives in `vfio_manager::cli`.

fn main() -> std::process::ExitCode {
    vfio_manager::cli::main(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}
