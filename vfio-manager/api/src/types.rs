//! The types that cross the bus.
//!
//! Bus name `org.vfiomanager.VfioManager1` (the `1` is the API version; an
//! incompatible change gets a new name). Objects:
//! - `/org/vfiomanager/VfioManager1`: interface `org.vfiomanager.VfioManager1.Manager`;
//! - `/org/vfiomanager/VfioManager1/device/<dddd_bb_dd_f>`: interface
//!   `org.vfiomanager.VfioManager1.Device`, one per managed function.

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedObjectPath, Type};

use crate::ids::PciAddress;

pub const BUS_NAME: &str = "org.vfiomanager.VfioManager1";
pub const MANAGER_PATH: &str = "/org/vfiomanager/VfioManager1";
pub const MANAGER_IFACE: &str = "org.vfiomanager.VfioManager1.Manager";
pub const DEVICE_IFACE: &str = "org.vfiomanager.VfioManager1.Device";
pub const ERROR_PREFIX: &str = "org.vfiomanager.VfioManager1.Error";

/// The object path of a device: `0000:3b:00.1` -> `.../device/0000_3b_00_1`.
pub fn device_path(address: &str) -> OwnedObjectPath {
    let tail: String = address
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    OwnedObjectPath::try_from(format!("{MANAGER_PATH}/device/{tail}"))
        .expect("an address mapped to [0-9a-z_] is a valid path element")
}

/// What a VM asks for. Sent as the `a{sv}` of `Provision` (keys: `request_id`,
/// `vm_uuid`, `profile`, `count`, `numa_node`, `pfs`, `devices`, `adopt`,
/// `on_failure`, `vmm`, `agent`, `on_idle`, `priority`), so that
/// fields can be added without a new API version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    /// Idempotency key: the same id returns the same lease.
    pub request_id: String,
    pub vm_name: String,
    pub vm_uuid: String,
    /// `vf` (any whole VF we manage), a PF model `vvvv:dddd` (a VF of such a PF),
    /// or a mediated profile: an mdev type id or name, or a vGPU type name or id.
    pub profile: String,
    pub count: u32,
    /// Only devices on this NUMA node (-1: any).
    pub numa_node: i32,
    /// Preferred PFs, tried first in this order.
    pub pfs: Vec<String>,
    /// Exactly these functions (a domain's `<hostdev>` addresses); `count` is their number.
    pub devices: Vec<String>,
    /// Take the devices even if their VFIO group is already open: a running VM whose
    /// lease was lost (libvirt's `reconnect` after the table was wiped).
    pub adopt: bool,
    /// When a device fails: `notify` or `replace` (`ids::OnFailure`); empty: the
    /// configuration's `[recovery]` decides.
    pub on_failure: String,
    /// Where the VM is, for a swap (`ids::Vmm`): `libvirt` (the domain `vm_name`),
    /// `ch:SOCKET` (cloud-hypervisor's API), or empty (none: a signal names the
    /// replacement).
    pub vmm: String,
    /// Where the VM's agent (vm-agent) speaks to the daemon (`ids::AgentChannel`):
    /// `cid:N`, `unix:/PATH`, `serial:/PATH`, or empty (no agent).
    pub agent: String,
    /// When the devices sit idle: `notify`, `unplug` or `release-on-stop`
    /// (`ids::OnIdle`); empty: the configuration's `[usage]` decides.
    pub on_idle: String,
    /// `low`, `normal` (empty) or `high` (`ids::Priority`): a high request may take
    /// the devices of idle low leases.
    pub priority: String,
}

impl Default for Request {
    fn default() -> Request {
        Request {
            request_id: String::new(),
            vm_name: String::new(),
            vm_uuid: String::new(),
            profile: "vf".into(),
            count: 1,
            numa_node: -1,
            pfs: Vec::new(),
            devices: Vec::new(),
            adopt: false,
            on_failure: String::new(),
            vmm: String::new(),
            agent: String::new(),
            on_idle: String::new(),
            priority: String::new(),
        }
    }
}

/// One device of a lease, with what each VMM needs to use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct LeasedDevice {
    pub address: String,
    pub id: String,
    /// `/sys/bus/pci/devices/<address>/`: cloud-hypervisor's `--device path=`.
    pub sysfs_path: String,
    /// `/dev/vfio/<group>` now (group numbers change across boots: never persist it).
    pub vfio_path: String,
    /// A libvirt `<hostdev>` for the domain XML (`managed='no'`: the daemon binds it).
    pub libvirt_hostdev: String,
    /// cloud-hypervisor's `--device` argument.
    pub ch_device: String,
}

impl LeasedDevice {
    /// A mediated device of a lease: libvirt and cloud-hypervisor take it by its
    /// sysfs path and UUID, not by a PCI address.
    pub fn mdev(uuid: &uuid::Uuid, type_id: String, group: Option<u32>) -> LeasedDevice {
        let sysfs_path = format!("/sys/bus/mdev/devices/{uuid}/");
        LeasedDevice {
            address: uuid.to_string(),
            id: type_id,
            ch_device: format!("path={sysfs_path}"),
            sysfs_path,
            vfio_path: group.map_or_else(String::new, |g| format!("/dev/vfio/{g}")),
            libvirt_hostdev: crate::xml::mdev_hostdev(uuid),
        }
    }

    pub fn new(address: PciAddress, id: String, group: Option<u32>) -> LeasedDevice {
        let sysfs_path = format!("/sys/bus/pci/devices/{address}/");
        LeasedDevice {
            address: address.to_string(),
            id,
            ch_device: format!("path={sysfs_path}"),
            sysfs_path,
            vfio_path: group.map_or_else(String::new, |g| format!("/dev/vfio/{g}")),
            libvirt_hostdev: crate::xml::pci_hostdev(address),
        }
    }
}

/// A lease's in-guest agent (`ListAgents`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct AgentInfo {
    pub lease_id: String,
    pub vm_name: String,
    /// The channel it spoke on (`cid:N`, `unix:PATH`, `serial:PATH`).
    pub channel: String,
    pub connected: bool,
    /// What the agent calls itself (`vm-agent 0.1.0`), and the guest's kernel.
    pub agent: String,
    pub kernel: String,
    /// When it said hello, and its last heartbeat (seconds since the epoch).
    pub since: u64,
    pub last_heartbeat: u64,
    /// Each leased device and the guest address it has there (`HOST=GUEST`).
    pub devices: Vec<String>,
}

/// A leased device's latest usage sample (`UsageNow`). NaN: the guest's source
/// does not say (JSON: null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type)]
pub struct UsageInfo {
    pub lease_id: String,
    pub vm_name: String,
    pub device: String,
    /// Where the guest read it: `net`, `drm-fdinfo`, `amdgpu`, `nvidia-smi`.
    pub source: String,
    pub busy_percent: f64,
    pub memory_percent: f64,
    pub temperature_c: f64,
    /// When the sample came (seconds since the epoch).
    pub at: u64,
}

/// A move `PlanRebalance` proposes: lease, mdev, from (parent), to, and the
/// predicted pressure at each, percent.
pub type RebalanceMove = (String, String, String, String, f64, f64);

/// A device's health (`Health`): a managed function, or a held-back mdev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct HealthInfo {
    /// A PCI address or an mdev UUID.
    pub name: String,
    /// `healthy`, `degraded`, `failed`, `quarantined` or `gone`.
    pub state: String,
    /// Why it is in that state (empty when healthy).
    pub reason: String,
    /// When it entered a held-back state (seconds since the epoch; 0: not held back).
    pub since: u64,
    /// PCIe errors the kernel counted since boot (AER).
    pub aer_correctable: u64,
    pub aer_nonfatal: u64,
    pub aer_fatal: u64,
}

/// An mdev that its VMM migrates with its VM (`VmMdevs`): (lease, UUID, type,
/// vendor driver, driver version).
pub type VmMdev = (String, String, String, String, String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct Lease {
    pub id: String,
    pub request_id: String,
    pub vm_name: String,
    pub vm_uuid: String,
    pub profile: String,
    pub devices: Vec<LeasedDevice>,
    /// Seconds since the epoch.
    pub created_at: u64,
}

/// One managed function as the daemon's table has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct DeviceInfo {
    pub address: String,
    pub id: String,
    /// The PF of a VF; empty for a PF.
    pub pf: String,
    /// The bound driver; empty for none.
    pub driver: String,
    /// -1: no IOMMU group.
    pub iommu_group: i32,
    /// -1: unknown.
    pub numa_node: i32,
    /// `ok`, `missing` (gone from sysfs), `failed` (an operation on it failed).
    pub health: String,
    /// The lease holding it; empty when free.
    pub lease_id: String,
    pub vm_name: String,
    pub provisions: u64,
    pub errors: u64,
}

/// One mediated device: active on the mdev bus, defined in mdevctl's files, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct MdevInfo {
    pub uuid: String,
    /// A PCI address or a device name (`mtty`).
    pub parent: String,
    pub type_id: String,
    /// The vendor driver bound to it; empty when inactive or unbound.
    pub driver: String,
    /// -1: inactive (or no group).
    pub iommu_group: i32,
    pub active: bool,
    /// `auto`, `manual`, or empty when not defined.
    pub defined: String,
    /// The lease holding it; empty when free.
    pub lease_id: String,
    pub vm_name: String,
}

/// Whether, and as what, a mediated device can migrate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct MigrationInfo {
    pub uuid: String,
    pub type_id: String,
    pub driver: String,
    pub driver_version: String,
    /// `VFIO_MIGRATION_*` flags the driver offers.
    pub flags: u64,
    /// The same flags by name (`STOP_COPY P2P PRE_COPY`).
    pub features: String,
}

/// What a finished outgoing migration measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct MigrationStats {
    pub bytes: u64,
    pub precopy_bytes: u64,
    /// From the source's STOP_COPY to the destination's verdict, in microseconds.
    pub downtime_us: u64,
    /// The states the source walked through.
    pub history: String,
}
