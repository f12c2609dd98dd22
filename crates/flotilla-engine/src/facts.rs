//! Deploy-time facts known before provisioning: the addresses machines will have.
//!
//! Facts are kept from one deploy to the next (stored in the state DB); what each platform
//! adds before provisioning is that platform's business (`plan_facts` in its module, reached
//! through `platform::plan_facts`): local machines get addresses on their deployment's
//! bridge, ssh machines their host. Keeping given addresses stable is what lets
//! `nodes.web1.ip` in another machine's config mean the same thing from one deploy to the
//! next. [`Subnet`] is here because a deployment's bridge is not one platform's alone.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use flotilla_model::{MachineName, Platform};
use serde_json::Value;

/// An IPv4 subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Parses `10.231.0.0/24`; the prefix must leave room for a bridge and a machine.
    pub fn parse(s: &str) -> Option<Subnet> {
        let (addr, prefix) = s.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        if !(8..=30).contains(&prefix) {
            return None;
        }
        let mask = u32::MAX << (32 - prefix);
        Some(Subnet { network: Ipv4Addr::from(u32::from(addr) & mask), prefix })
    }

    /// Whether `a` is a host address of this subnet (not network or broadcast).
    pub fn contains_host(&self, a: Ipv4Addr) -> bool {
        let size = 1u32 << (32 - self.prefix);
        let off = u32::from(a).wrapping_sub(u32::from(self.network));
        off > 0 && off < size - 1
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let prefix = self.prefix.min(other.prefix);
        let mask = u32::MAX << (32 - prefix);
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }

    /// The bridge's own address: the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Its machine addresses, lowest first (the first host is the bridge's).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        let base = u32::from(self.network);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A problem planning facts, naming the machine and option.
pub type PlanError = String;

/// A machine's facts: what its configuration sees of it as `nodes.<name>`.
pub type Facts = BTreeMap<String, Value>;

/// Plans facts for every machine: stored facts are kept, each machine's platform adds what it
/// knows before provisioning (`platform::plan_facts`: a local machine's address, an ssh
/// host's name). Returns the full fact set, or every problem found.
pub fn plan(platforms: &BTreeMap<MachineName, Platform>, stored: &BTreeMap<String, Facts>) -> Result<BTreeMap<MachineName, Facts>, Vec<PlanError>> {
    let mut out: BTreeMap<MachineName, Facts> = platforms
        .iter()
        .map(|(name, platform)| {
            let mut facts = stored.get(name.as_str()).cloned().unwrap_or_default();
            facts.insert("platform".into(), Value::from(platform.kind()));
            (name.clone(), facts)
        })
        .collect();
    let errors = crate::platform::plan_facts(platforms, stored, &mut out);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::LocalPlatform;

    fn local(address: Option<&str>, subnet: &str) -> Platform {
        Platform::Local(LocalPlatform { address: address.map(str::to_owned), subnet: subnet.into(), forward_ports: vec![] })
    }

    fn m(n: &str) -> MachineName {
        MachineName::new(n).unwrap()
    }

    #[test]
    fn allocates_lowest_free_and_keeps_given_ones() {
        let mut p = BTreeMap::new();
        p.insert(m("a"), local(None, "10.9.0.0/24"));
        p.insert(m("b"), local(Some("10.9.0.2"), "10.9.0.0/24"));
        p.insert(m("c"), local(None, "10.9.0.0/24"));
        let mut stored = BTreeMap::new();
        stored.insert("c".to_owned(), [("ip".to_owned(), Value::from("10.9.0.7"))].into());
        let f = plan(&p, &stored).unwrap();
        assert_eq!(f[&m("b")]["ip"], "10.9.0.2");
        assert_eq!(f[&m("c")]["ip"], "10.9.0.7");
        assert_eq!(f[&m("a")]["ip"], "10.9.0.3");
        assert_eq!(f[&m("a")]["subnet"], "10.9.0.0/24");
    }

    #[test]
    fn refuses_clashes_and_mixed_subnets() {
        let mut p = BTreeMap::new();
        p.insert(m("a"), local(Some("10.9.0.5"), "10.9.0.0/24"));
        p.insert(m("b"), local(Some("10.9.0.5"), "10.9.0.0/24"));
        p.insert(m("c"), local(None, "10.8.0.0/24"));
        p.insert(m("d"), local(Some("10.9.0.1"), "10.9.0.0/24"));
        let e = plan(&p, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(e[0].contains("already machine a's"));
        assert!(e[1].contains("share one bridge"));
        assert!(e[2].contains("bridge's"));
    }

    #[test]
    fn refuses_one_host_port_forwarded_to_two_machines() {
        let fwd = |host| {
            Platform::Local(LocalPlatform {
                address: None,
                subnet: "10.9.0.0/24".into(),
                forward_ports: vec![flotilla_model::PortForward { host, guest: 80 }],
            })
        };
        let p: BTreeMap<_, _> = [(m("a"), fwd(8080)), (m("b"), fwd(8080)), (m("c"), fwd(8081))].into();
        let e = plan(&p, &BTreeMap::new()).unwrap_err();
        assert_eq!(e, ["machine b: option `platform.forwardPorts` forwards host port 8080 which machine a forwards too; give one of them another `host` port"]);
    }

    #[test]
    fn a_machine_gone_from_the_file_keeps_its_address_until_destroyed() {
        let p: BTreeMap<_, _> = [(m("new"), local(None, "10.9.0.0/24"))].into();
        let stored: BTreeMap<String, BTreeMap<String, Value>> = [("old".to_owned(), [("ip".to_owned(), Value::from("10.9.0.2"))].into())].into();
        let f = plan(&p, &stored).unwrap();
        assert_eq!(f[&m("new")]["ip"], "10.9.0.3");
    }

    #[test]
    fn subnets_overlap_when_one_holds_the_other() {
        let p = |s| Subnet::parse(s).unwrap();
        assert!(p("10.0.0.0/8").overlaps(&p("10.231.0.0/24")));
        assert!(p("10.231.0.0/24").overlaps(&p("10.0.0.0/8")));
        assert!(!p("10.231.0.0/24").overlaps(&p("10.232.0.0/24")));
    }

    #[test]
    fn subnet_parsing() {
        let s = Subnet::parse("10.231.0.77/24").unwrap();
        assert_eq!(s.to_string(), "10.231.0.0/24");
        assert_eq!(s.gateway().to_string(), "10.231.0.1");
        assert!(!s.contains_host("10.231.0.255".parse().unwrap()));
        assert!(Subnet::parse("10.0.0.0/31").is_none());
        assert!(Subnet::parse("nope").is_none());
    }
}
