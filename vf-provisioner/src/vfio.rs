//! Opening a vfio-bound function through the VFIO container/group API (the only one
//! Debian's 6.12 has: IOMMUFD is off) with vfio-ioctls. The container is always
//! `/dev/vfio/vfio`, so this works on the real kernel only.

use std::sync::Arc;

use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_ioctls::{VfioContainer, VfioDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::address::PciAddress;
use crate::error::{Error, Result};
use crate::host::PciFunction;
use crate::sysfs::Sysfs;

pub struct OpenDevice {
    address: PciAddress,
    device: VfioDevice,
    // The device borrows the container's group: keep it alive as long as the device.
    container: Arc<VfioContainer>,
}

/// How much memory the DMA-mapping probe maps: one 2 MiB page's worth.
const PROBE_BYTES: usize = 2 << 20;

fn vfio_err(
    device: PciAddress,
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Vfio {
        device,
        what: what.into(),
        source: Box::new(e),
    }
}

impl OpenDevice {
    /// Opens `addr`, which must be bound to vfio-pci and not held by anyone else
    /// (the kernel lets one process hold a group).
    pub fn open(sys: &Sysfs, addr: &PciAddress) -> Result<Self> {
        let f = PciFunction::read(sys, addr).ok_or(Error::NoSuchDevice(*addr))?;
        if !f.on_vfio() {
            return Err(Error::refused(
                *addr,
                "it is not bound to vfio-pci",
                format!("run `vfctl bind {addr}` first"),
            ));
        }
        let container = Arc::new(
            VfioContainer::new(None).map_err(|e| vfio_err(*addr, "opening /dev/vfio/vfio", e))?,
        );
        let device = VfioDevice::new(&sys.device_dir(addr), container.clone(), false)
            .map_err(|e| vfio_err(*addr, "opening the device through its group", e))?;
        Ok(OpenDevice {
            address: *addr,
            device,
            container,
        })
    }

    /// Reads `len` bytes of PCI config space at `offset`, checked against the
    /// region's size (vfio-ioctls only logs a short read).
    pub fn config_read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX);
        if offset + len as u64 > size {
            return Err(Error::InvalidInput {
                what: "config space range",
                input: format!("{offset:#x}+{len}"),
                reason: format!("{}'s config region is {size} bytes", self.address),
            });
        }
        let mut buf = vec![0xff; len];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut buf, offset);
        Ok(buf)
    }

    /// The DMA-mapping probe: maps 2 MiB of memory of its own (vm-memory) for the
    /// device through its IOMMU at IO address 0, then unmaps it. It proves what a VMM
    /// will do first with the device (its group in a container, the type-1 IOMMU
    /// set, a mapping the IOMMU accepts) before the device is handed out.
    pub fn dma_probe(&self) -> Result<()> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PROBE_BYTES)])
            .map_err(|e| vfio_err(self.address, "allocating the probe's memory", e))?;
        // SAFETY: `mem` is this function's own anonymous mapping, shared with no one
        // and never referenced from Rust while it is mapped for DMA; the device is
        // not started (bound to vfio-pci, opened here only), so it does not use the
        // mapping; the mapping is undone below before `mem` can be dropped, and on
        // a failed unmap `mem` is leaked instead of freed.
        unsafe { self.container.vfio_map_guest_memory(&mem) }.map_err(|e| {
            vfio_err(
                self.address,
                "mapping memory for DMA (VFIO_IOMMU_MAP_DMA)",
                e,
            )
        })?;
        if let Err(e) = self.container.vfio_unmap_guest_memory(&mem) {
            std::mem::forget(mem);
            return Err(vfio_err(
                self.address,
                "unmapping the probe's memory (VFIO_IOMMU_UNMAP_DMA)",
                e,
            ));
        }
        Ok(())
    }

    /// Vendor and device id as the device itself reports them.
    pub fn ids(&self) -> Result<(u16, u16)> {
        let b = self.config_read(0, 4)?;
        Ok((
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        ))
    }
}
