//! Deploy-time facts known before provisioning: the addresses machines will have.
//!
//! Local machines get addresses on their deployment's bridge: a fixed `platform.address`, the
//! one they were given before (stored facts), or the lowest free one. Keeping given addresses
//! stable is what lets `nodes.web1.ip` in another machine's config mean the same thing from
//! one deploy to the next.

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

    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
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

/// Plans facts for every machine: stored facts are kept; local machines without an address
/// get one. Returns the full fact set, or every problem found.
pub fn plan(
    platforms: &BTreeMap<MachineName, Platform>,
    stored: &BTreeMap<String, BTreeMap<String, Value>>,
) -> Result<BTreeMap<MachineName, BTreeMap<String, Value>>, Vec<PlanError>> {
    let mut errors = Vec::new();
    let mut out: BTreeMap<MachineName, BTreeMap<String, Value>> = BTreeMap::new();
    let mut subnet: Option<(Subnet, &MachineName)> = None;
    let mut taken: BTreeMap<Ipv4Addr, &MachineName> = BTreeMap::new();
    let mut wanting: Vec<&MachineName> = Vec::new();
    let mut forwarded: BTreeMap<u16, &MachineName> = BTreeMap::new();
    // Machines still recorded but no longer in the file may still run (only `destroy` ends
    // them): their addresses are not free.
    let gone: Vec<MachineName> = stored
        .iter()
        .filter(|(n, _)| !platforms.keys().any(|p| p.as_str() == n.as_str()))
        .filter_map(|(n, _)| MachineName::new(n).ok())
        .collect();
    for name in &gone {
        if let Some(ip) = stored[name.as_str()].get("ip").and_then(Value::as_str).and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
            taken.insert(ip, name);
        }
    }

    for (name, platform) in platforms {
        let mut facts = stored.get(name.as_str()).cloned().unwrap_or_default();
        facts.insert("platform".into(), Value::from(platform.kind()));
        match platform {
            Platform::Local(local) => {
                let Some(s) = Subnet::parse(&local.subnet) else {
                    errors.push(format!("machine {name}: option `platform.subnet` is \"{}\", which is not an IPv4 subnet in CIDR form with a prefix from /8 to /30, e.g. \"10.231.0.0/24\"", local.subnet));
                    continue;
                };
                match subnet {
                    Some((first, other)) if first != s => {
                        errors.push(format!("machine {name}: option `platform.subnet` is {s} but machine {other} uses {first}; the local machines of one deployment share one bridge, so set the same subnet on all (e.g. in `defaults`)"));
                        continue;
                    }
                    None => subnet = Some((s, name)),
                    _ => {}
                }
                facts.insert("subnet".into(), Value::from(s.to_string()));
                for f in &local.forward_ports {
                    if let Some(other) = forwarded.insert(f.host, name) {
                        errors.push(format!("machine {name}: option `platform.forwardPorts` forwards host port {} which machine {other} forwards too; give one of them another `host` port", f.host));
                    }
                }
                let fixed = match &local.address {
                    Some(a) => match a.parse::<Ipv4Addr>() {
                        Ok(ip) if s.contains_host(ip) && ip != s.gateway() => Some(ip),
                        _ => {
                            errors.push(format!("machine {name}: option `platform.address` is \"{a}\", which is not a machine address in {s} (the first one, {}, is the bridge's)", s.gateway()));
                            continue;
                        }
                    },
                    None => facts
                        .get("ip")
                        .and_then(Value::as_str)
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                        .filter(|ip| s.contains_host(*ip) && *ip != s.gateway()),
                };
                match fixed {
                    Some(ip) => {
                        if let Some(other) = taken.insert(ip, name) {
                            errors.push(format!("machine {name}: address {ip} is already machine {other}'s; give one of them another `platform.address`"));
                        }
                        facts.insert("ip".into(), Value::from(ip.to_string()));
                    }
                    None => {
                        facts.remove("ip");
                        wanting.push(name);
                    }
                }
            }
            Platform::Ssh(ssh) => {
                facts.entry("ip".into()).or_insert_with(|| Value::from(ssh.host.clone()));
            }
            Platform::Qemu(_) => {}
        }
        out.insert(name.clone(), facts);
    }

    if let Some((s, _)) = subnet {
        let mut free = s.hosts().filter(|ip| !taken.contains_key(ip));
        for name in wanting {
            match free.next() {
                Some(ip) => {
                    out.get_mut(name).expect("planned above").insert("ip".into(), Value::from(ip.to_string()));
                }
                None => errors.push(format!("machine {name}: subnet {s} has no free address left; use a larger `platform.subnet`")),
            }
        }
    }
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
