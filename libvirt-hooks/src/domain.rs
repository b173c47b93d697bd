//! What a libvirt domain XML says about our devices, and the XML rewritten for the
//! devices leased on this host. Parsing is read-only (roxmltree); rewriting splices
//! new `<address>` elements into the original text, so everything else libvirt wrote
//! stays byte for byte.

use std::ops::Range;

use vfio_manager_api::ids::PciAddress;

/// The namespace of our metadata element:
/// `<vfm:lease xmlns:vfm="http://vfio-manager.org/xmlns/lease/1" profile="vf" count="2"
/// on_failure="replace" on_idle="unplug"/>`.
pub const NAMESPACE: &str = "http://vfio-manager.org/xmlns/lease/1";

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("the domain XML does not parse: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("domain {domain}: {what}")]
    Invalid { domain: String, what: String },
}

/// A PCI `<hostdev>` and where its `<source><address>` sits in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostdev {
    pub address: PciAddress,
    /// libvirt binds `managed='yes'` devices itself; ours are `managed='no'`.
    pub managed: bool,
    range: Range<usize>,
}

/// An mdev `<hostdev>`: its UUID, and where its `<source><address>` sits in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdevHostdev {
    pub uuid: String,
    range: Range<usize>,
}

/// What the metadata element asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub profile: String,
    pub count: u32,
    /// `notify` or `replace` (checked by the daemon); empty: its configuration's.
    pub on_failure: String,
    /// `notify`, `unplug` or `release-on-stop` (checked by the daemon); empty: its
    /// configuration's.
    pub on_idle: String,
}

/// The virtio-serial port name vm-agent opens when the guest has no vsock.
pub const AGENT_PORT: &str = "org.vfiomanager.agent.0";

#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    pub hostdevs: Vec<Hostdev>,
    /// `<hostdev type='mdev'>` devices.
    pub mdevs: Vec<MdevHostdev>,
    pub wanted: Option<Wanted>,
    /// Where the guest's agent speaks (`ids::AgentChannel`, checked by the daemon):
    /// `cid:N` from `<vsock><cid address='N'/>`, or `serial:PATH` from a `<channel
    /// type='unix'>` QEMU binds whose target is [`AGENT_PORT`]; empty: none.
    pub agent: String,
}

impl Domain {
    pub fn parse(xml: &str) -> Result<Domain, DomainError> {
        // roxmltree recurses once per level: the depth is checked first, by a
        // streaming reader that does not.
        if too_deep(xml) {
            return Err(DomainError::Invalid {
                domain: String::new(),
                what: format!(
                    "the XML nests deeper than {MAX_DEPTH} elements; libvirt's never does"
                ),
            });
        }
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        let text = |tag: &str| {
            root.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let name = text("name");
        let invalid = |what: String| DomainError::Invalid {
            domain: name.clone(),
            what,
        };
        let mut d = Domain {
            uuid: text("uuid"),
            name: name.clone(),
            hostdevs: Vec::new(),
            mdevs: Vec::new(),
            wanted: None,
            agent: agent_channel(&root),
        };
        for n in root.descendants().filter(|n| n.has_tag_name("hostdev")) {
            let source = n.children().find(|c| c.has_tag_name("source"));
            let addr = source.and_then(|s| s.children().find(|c| c.has_tag_name("address")));
            match (n.attribute("type"), addr) {
                (Some("pci"), Some(a)) => d.hostdevs.push(Hostdev {
                    address: pci_address(&a).map_err(invalid)?,
                    managed: n.attribute("managed") == Some("yes"),
                    range: a.range(),
                }),
                (Some("mdev"), Some(a)) => {
                    d.mdevs.extend(a.attribute("uuid").map(|u| MdevHostdev {
                        uuid: u.to_string(),
                        range: a.range(),
                    }))
                }
                _ => {}
            }
        }
        let meta = root
            .descendants()
            .find(|n| n.has_tag_name((NAMESPACE, "lease")));
        if let Some(m) = meta {
            let count = m.attribute("count").unwrap_or("1");
            d.wanted = Some(Wanted {
                profile: m.attribute("profile").unwrap_or("vf").to_string(),
                count: count.parse().map_err(|_| {
                    invalid(format!("lease metadata: count {count:?} is not a number"))
                })?,
                on_failure: m.attribute("on_failure").unwrap_or_default().to_string(),
                on_idle: m.attribute("on_idle").unwrap_or_default().to_string(),
            });
        }
        Ok(d)
    }

    /// Whether anything here could be ours (without asking the daemon): lease
    /// metadata or a PCI hostdev that libvirt does not manage.
    pub fn may_be_ours(&self) -> bool {
        self.wanted.is_some() || self.hostdevs.iter().any(|h| !h.managed)
    }

    /// The UUIDs of its mdev hostdevs.
    pub fn mdev_uuids(&self) -> Vec<String> {
        self.mdevs.iter().map(|m| m.uuid.clone()).collect()
    }

    /// The hostdevs a lease's devices fill, in order: with lease metadata, every
    /// `managed='no'` PCI hostdev; without, none.
    pub fn lease_slots(&self) -> Vec<&Hostdev> {
        match self.wanted {
            Some(_) => self.hostdevs.iter().filter(|h| !h.managed).collect(),
            None => Vec::new(),
        }
    }
}

/// The agent's channel: a vsock with a fixed context id (one libvirt picks with
/// `auto='yes'` is not in the XML the hook is given before the start), else the
/// agent's virtio-serial port.
fn agent_channel(root: &roxmltree::Node) -> String {
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children().find(|c| c.has_tag_name(tag))
    }
    for n in root.descendants() {
        if n.has_tag_name("vsock") {
            if let Some(a) = child(n, "cid").and_then(|c| c.attribute("address")) {
                return format!("cid:{a}");
            }
        }
        let is_agent = child(n, "target").and_then(|t| t.attribute("name")) == Some(AGENT_PORT);
        if n.has_tag_name("channel") && n.attribute("type") == Some("unix") && is_agent {
            let source = child(n, "source").filter(|s| s.attribute("mode") == Some("bind"));
            if let Some(p) = source.and_then(|s| s.attribute("path")) {
                return format!("serial:{p}");
            }
        }
    }
    String::new()
}

/// The deepest nesting a domain may have: libvirt's go about ten deep.
pub const MAX_DEPTH: usize = 64;

/// Whether an element nests deeper than [`MAX_DEPTH`] (malformed XML is left to
/// the parser to name).
fn too_deep(xml: &str) -> bool {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut depth = 0usize;
    loop {
        match reader.read_event() {
            Ok(Event::Start(_)) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Eof) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// `xml` with each of `slots` pointing at the matching address of `to`.
pub fn rewrite(xml: &str, slots: &[&Hostdev], to: &[PciAddress]) -> String {
    let pairs = slots
        .iter()
        .zip(to)
        .map(|(h, a)| (&h.range, address_element(*a)));
    splice(xml, pairs.collect())
}

/// `xml` with mdev hostdev `slot` naming the mdev `to` (a UUID the daemon made).
pub fn rewrite_mdev(xml: &str, slot: &MdevHostdev, to: &uuid::Uuid) -> String {
    splice(xml, vec![(&slot.range, format!("<address uuid='{to}'/>"))])
}

/// `xml` with each range replaced by its text; everything else byte for byte.
fn splice(xml: &str, mut pairs: Vec<(&Range<usize>, String)>) -> String {
    pairs.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for (r, text) in pairs {
        out.push_str(&xml[at..r.start]);
        out.push_str(&text);
        at = r.end;
    }
    out.push_str(&xml[at..]);
    out
}

/// libvirt's `<address>` for a PCI function, from the contract's XML writer.
pub use vfio_manager_api::xml::pci_address as address_element;

fn pci_address(n: &roxmltree::Node) -> Result<PciAddress, String> {
    let field = |name: &str, max: u32| -> Result<u32, String> {
        let v = n.attribute(name).unwrap_or("0");
        let digits = v.strip_prefix("0x").unwrap_or(v);
        u32::from_str_radix(digits, if v.starts_with("0x") { 16 } else { 10 })
            .ok()
            .filter(|x| *x <= max)
            .ok_or_else(|| format!("hostdev address {name}={v:?} is not a number up to {max:#x}"))
    };
    let text = format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        field("domain", 0xffff)?,
        field("bus", 0xff)?,
        field("slot", 0x1f)?,
        field("function", 7)?
    );
    text.parse()
        .map_err(|e| format!("hostdev address {text}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'>
  <name>vm1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata>
    <vfm:lease xmlns:vfm="http://vfio-manager.org/xmlns/lease/1" profile="8086:10c9" count="2"/>
  </metadata>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source><address domain='0x0000' bus='0x01' slot='0x10' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x05' slot='0x00' function='0x0'/></source>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source><address domain='0x0000' bus='0x01' slot='0x10' function='0x2'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source>
    </hostdev>
  </devices>
</domain>"#;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn reads_hostdevs_mdevs_and_metadata() {
        let d = Domain::parse(XML).unwrap();
        assert_eq!(d.name, "vm1");
        assert_eq!(d.uuid, "4dea22b3-1d52-d8f3-2516-782e98ab3fa0");
        let addrs: Vec<String> = d.hostdevs.iter().map(|h| h.address.to_string()).collect();
        assert_eq!(addrs, ["0000:01:10.0", "0000:05:00.0", "0000:01:10.2"]);
        assert_eq!(d.mdev_uuids(), ["c2177883-f1bb-47f0-914d-32a22e3a8804"]);
        assert_eq!(
            d.wanted,
            Some(Wanted {
                profile: "8086:10c9".into(),
                count: 2,
                on_failure: String::new(),
                on_idle: String::new(),
            })
        );
        assert_eq!(
            d.lease_slots().len(),
            2,
            "managed='yes' is libvirt's, not a slot"
        );
    }

    #[test]
    fn the_agent_channel_is_a_fixed_vsock_cid_else_the_agents_serial_port() {
        let with = |devices: &str| {
            let xml = XML.replace("</devices>", &format!("{devices}</devices>"));
            Domain::parse(&xml).unwrap().agent
        };
        assert_eq!(Domain::parse(XML).unwrap().agent, "");
        assert_eq!(
            with("<vsock model='virtio'><cid auto='no' address='5'/></vsock>"),
            "cid:5"
        );
        // auto='yes' before the start: libvirt has not picked one yet.
        assert_eq!(with("<vsock model='virtio'><cid auto='yes'/></vsock>"), "");
        let channel = |mode: &str, name: &str| {
            format!("<channel type='unix'><source mode='{mode}' path='/run/a.sock'/><target type='virtio' name='{name}'/></channel>")
        };
        assert_eq!(with(&channel("bind", AGENT_PORT)), "serial:/run/a.sock");
        assert_eq!(with(&channel("connect", AGENT_PORT)), "");
        assert_eq!(with(&channel("bind", "org.qemu.guest_agent.0")), "");
        // What it says is the daemon's to check (ids::AgentChannel), not the hook's.
        assert_eq!(
            with("<vsock><cid address='../../x'/></vsock>"),
            "cid:../../x"
        );
    }

    #[test]
    fn rewriting_changes_only_the_slots_source_addresses() {
        let d = Domain::parse(XML).unwrap();
        let out = rewrite(
            XML,
            &d.lease_slots(),
            &[a("0000:03:00.4"), a("0000:03:00.6")],
        );
        let back = Domain::parse(&out).unwrap();
        let addrs: Vec<String> = back
            .hostdevs
            .iter()
            .map(|h| h.address.to_string())
            .collect();
        assert_eq!(addrs, ["0000:03:00.4", "0000:05:00.0", "0000:03:00.6"]);
        // The guest-side <address type='pci'> of the managed hostdev is untouched.
        assert!(out.contains("<address type='pci' domain='0x0000' bus='0x07'"));
        assert_eq!(
            out.len(),
            XML.len(),
            "same-length addresses: nothing else moved"
        );
    }

    #[test]
    fn a_domain_without_our_things_is_recognised_without_the_daemon() {
        let d = Domain::parse("<domain type='kvm'><name>x</name><devices/></domain>").unwrap();
        assert!(!d.may_be_ours());
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = format!(
            "<domain>{}{}</domain>",
            "<a>".repeat(100_000),
            "</a>".repeat(100_000)
        );
        let e = Domain::parse(&deep).unwrap_err().to_string();
        assert!(e.contains("nests deeper"), "{e}");
        let ok = format!("<domain>{}{}</domain>", "<a>".repeat(30), "</a>".repeat(30));
        Domain::parse(&ok).unwrap();
    }

    #[test]
    fn bad_addresses_and_counts_are_named() {
        let bad = XML.replace("slot='0x10' function='0x2'", "slot='0x10' function='0x9'");
        let e = Domain::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("vm1") && e.contains("function=\"0x9\""), "{e}");
        let bad = XML.replace("count=\"2\"", "count=\"two\"");
        let e = Domain::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("count \"two\""), "{e}");
    }
}
