//! The D-Bus contract, from its own crate (`vfio-manager-api`), and what the daemon
//! and `vfctl --direct` add to it: an mdev's info made from what the kernel and
//! mdevctl's files say.

pub use vfio_manager_api::*;

/// An mdev as the kernel shows it (`m`) and as its definition has it; `None` if
/// neither. Not leased: the daemon fills that in.
pub fn mdev_info(
    m: Option<&mediated_dev::Mdev>,
    def: Option<&mediated_dev::Definition>,
) -> Option<MdevInfo> {
    let (uuid, parent, type_id) = match (m, def) {
        (Some(m), _) => (m.uuid, m.parent.to_string(), m.type_id.to_string()),
        (None, Some(d)) => (d.uuid, d.parent.to_string(), d.config.mdev_type.to_string()),
        (None, None) => return None,
    };
    Some(MdevInfo {
        uuid: uuid.to_string(),
        parent,
        type_id,
        driver: m.and_then(|m| m.driver.clone()).unwrap_or_default(),
        iommu_group: m.and_then(|m| m.iommu_group).map_or(-1, |g| g as i32),
        active: m.is_some(),
        defined: def
            .map_or("", |d| match d.config.start {
                mediated_dev::Start::Auto => "auto",
                mediated_dev::Start::Manual => "manual",
            })
            .into(),
        lease_id: String::new(),
        vm_name: String::new(),
    })
}

/// Active mdevs, then defined ones that are not active.
pub fn mdev_infos(
    host: &mediated_dev::MdevHost,
    defs: &[mediated_dev::Definition],
) -> Vec<MdevInfo> {
    let def = |u: uuid::Uuid| defs.iter().find(|d| d.uuid == u);
    host.mdevs
        .iter()
        .filter_map(|m| mdev_info(Some(m), def(m.uuid)))
        .chain(
            defs.iter()
                .filter(|d| host.mdev(&d.uuid).is_none())
                .filter_map(|d| mdev_info(None, Some(d))),
        )
        .collect()
}
