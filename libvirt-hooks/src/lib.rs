//! libvirt's qemu hook for vfio-manager. `domain` reads (and for incoming domains
//! rewrites) the domain XML; `hook` decides what each libvirt operation means for
//! the domain's lease and asks the daemon over D-Bus. The binary is `main.rs`.

pub mod domain;
pub mod hook;
