//! vfio-manager: the host service and its `vfctl` CLI. For now `vfctl` works
//! directly on the host through `vf-provisioner`; requests enter in [`cli`].

pub mod cli;
