//! The local platform's facts before provisioning: every local machine of a deployment gets
//! an address on the deployment's one bridge (one subnet for all of them): its fixed
//! `platform.address`, the one it was given before, or the lowest free one. Addresses of
//! machines gone from the file but not destroyed stay taken, as they may still run.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use flotilla_model::{LocalPlatform, MachineName};
use serde_json::Value;

use crate::facts::{Facts, PlanError, Subnet};

/// Adds `ip` and `subnet` to the facts of the local machines `machines`; `facts` holds every
/// machine of the file (with its stored facts), `stored` every machine recorded.
pub fn plan_facts(machines: &BTreeMap<&MachineName, &LocalPlatform>, stored: &BTreeMap<String, Facts>, facts: &mut BTreeMap<MachineName, Facts>) -> Vec<PlanError> {
    let mut errors = Vec::new();
    let mut subnet: Option<(Subnet, &MachineName)> = None;
    let mut taken: BTreeMap<Ipv4Addr, MachineName> = BTreeMap::new();
    let mut wanting: Vec<&MachineName> = Vec::new();
    let mut forwarded: BTreeMap<u16, &MachineName> = BTreeMap::new();
    // Machines still recorded but no longer in the file may still run (only `destroy` ends
    // them): their addresses are not free.
    for (n, f) in stored.iter().filter(|(n, _)| !facts.keys().any(|p| p.as_str() == n.as_str())) {
        let (Ok(name), Some(ip)) = (MachineName::new(n), f.get("ip").and_then(Value::as_str).and_then(|ip| ip.parse::<Ipv4Addr>().ok())) else { continue };
        taken.insert(ip, name);
    }

    for (&name, local) in machines {
        let facts = facts.get_mut(name).expect("every machine of the file has facts");
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
            None => facts.get("ip").and_then(Value::as_str).and_then(|ip| ip.parse::<Ipv4Addr>().ok()).filter(|ip| s.contains_host(*ip) && *ip != s.gateway()),
        };
        match fixed {
            Some(ip) => {
                if let Some(other) = taken.insert(ip, name.clone()) {
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

    if let Some((s, _)) = subnet {
        let mut free = s.hosts().filter(|ip| !taken.contains_key(ip));
        for name in wanting {
            match free.next() {
                Some(ip) => {
                    facts.get_mut(name).expect("planned above").insert("ip".into(), Value::from(ip.to_string()));
                }
                None => errors.push(format!("machine {name}: subnet {s} has no free address left; use a larger `platform.subnet`")),
            }
        }
    }
    errors
}
