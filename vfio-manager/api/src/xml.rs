//! libvirt XML, written with an XML writer (quick-xml escapes every attribute and
//! text), never by formatting strings: no name that reaches it can close an
//! element or open another.

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;
use uuid::Uuid;

use crate::ids::PciAddress;

type W = Writer<Vec<u8>>;

fn text(w: W) -> String {
    String::from_utf8(w.into_inner()).expect("the writer writes the UTF-8 it is given")
}

fn empty(w: &mut W, name: &str, attrs: &[(&str, &str)]) {
    let mut e = BytesStart::new(name);
    e.extend_attributes(attrs.iter().copied());
    w.write_event(Event::Empty(e)).expect("writing to a Vec");
}

fn open(w: &mut W, name: &str, attrs: &[(&str, &str)]) {
    let mut e = BytesStart::new(name);
    e.extend_attributes(attrs.iter().copied());
    w.write_event(Event::Start(e)).expect("writing to a Vec");
}

fn close(w: &mut W, name: &str) {
    w.write_event(Event::End(BytesEnd::new(name)))
        .expect("writing to a Vec");
}

fn address(w: &mut W, a: PciAddress) {
    let (d, b, s, f) = (
        format!("0x{:04x}", a.domain),
        format!("0x{:02x}", a.bus),
        format!("0x{:02x}", a.device),
        format!("0x{:x}", a.function),
    );
    empty(
        w,
        "address",
        &[("domain", &d), ("bus", &b), ("slot", &s), ("function", &f)],
    );
}

/// libvirt's `<address>` of a host PCI function (a hostdev's source).
pub fn pci_address(a: PciAddress) -> String {
    let mut w = Writer::new(Vec::new());
    address(&mut w, a);
    text(w)
}

/// A `<hostdev>` of a whole PCI function; `managed='no'`: the daemon binds it.
pub fn pci_hostdev(a: PciAddress) -> String {
    let mut w = Writer::new(Vec::new());
    open(
        &mut w,
        "hostdev",
        &[("mode", "subsystem"), ("type", "pci"), ("managed", "no")],
    );
    open(&mut w, "source", &[]);
    address(&mut w, a);
    close(&mut w, "source");
    close(&mut w, "hostdev");
    text(w)
}

/// A `<hostdev>` of a mediated device, by UUID.
pub fn mdev_hostdev(uuid: &Uuid) -> String {
    let mut w = Writer::new(Vec::new());
    let u = uuid.to_string();
    open(
        &mut w,
        "hostdev",
        &[
            ("mode", "subsystem"),
            ("type", "mdev"),
            ("model", "vfio-pci"),
            ("managed", "no"),
        ],
    );
    open(&mut w, "source", &[]);
    empty(&mut w, "address", &[("uuid", &u)]);
    close(&mut w, "source");
    close(&mut w, "hostdev");
    text(w)
}

/// An XML comment whose text cannot end it early: `--` (which a comment may not
/// hold) and control characters are replaced.
pub fn comment(s: &str) -> String {
    let mut clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    while clean.contains("--") {
        clean = clean.replace("--", "- ");
    }
    let mut w = Writer::new(Vec::new());
    w.write_event(Event::Comment(BytesText::from_escaped(format!(
        " {clean} "
    ))))
    .expect("writing to a Vec");
    text(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostdevs_are_what_libvirt_reads() {
        let a: PciAddress = "0000:3b:00.4".parse().unwrap();
        assert_eq!(
            pci_hostdev(a),
            "<hostdev mode=\"subsystem\" type=\"pci\" managed=\"no\"><source><address domain=\"0x0000\" bus=\"0x3b\" slot=\"0x00\" function=\"0x4\"/></source></hostdev>"
        );
        let u: Uuid = "5a5a0000-0000-4000-8000-000000000001".parse().unwrap();
        assert!(
            mdev_hostdev(&u).contains("<address uuid=\"5a5a0000-0000-4000-8000-000000000001\"/>")
        );
    }

    #[test]
    fn a_comment_cannot_be_closed_by_its_text() {
        for hostile in ["x --><hostdev/><!--", "a-", "--->", "\n<!--", "-"] {
            let c = comment(hostile);
            let inner = &c[4..c.len() - 3];
            assert!(c.starts_with("<!--") && c.ends_with("-->"), "{c}");
            assert!(!inner.contains("--") && !inner.ends_with('-'), "{c}");
        }
    }
}
