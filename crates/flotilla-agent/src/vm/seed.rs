//! cloud-init's NoCloud seed: a disk labelled `cidata` (iso9660 or vfat) holding `meta-data`
//! (`instance-id`, `local-hostname`) and `network-config` (version 1 or 2, a static address
//! with its gateway, or DHCP). Clouds and `flotilla image` users configure a VM this way when
//! the kernel command line says nothing.
//!
//! The files are YAML; the agent reads only the few keys above, line by line, to stay free of
//! a YAML parser: it must never fail the boot over a seed it half understands, only say so.

use std::path::Path;

use super::net::{parse_cidr, Network};
use super::{stage1, sys};

/// What a seed says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seed {
    /// `local-hostname` of meta-data.
    pub hostname: Option<String>,
    /// The network of network-config.
    pub network: Option<Network>,
}

/// The filesystem type of a seed disk: `vfat` or `iso9660` when labelled `cidata`.
pub fn seed_type(head: &[u8]) -> Option<&'static str> {
    let label = |at: usize, len: usize| head.get(at..at + len).map(|b| String::from_utf8_lossy(b).trim_end().to_ascii_lowercase());
    if head.get(32769..32774) == Some(b"CD001") && label(32808, 32).as_deref() == Some("cidata") {
        return Some("iso9660");
    }
    if head.get(510..512) == Some(&[0x55, 0xaa]) {
        // FAT12/16 keep the label at 43, FAT32 at 71.
        if head.get(54..57) == Some(b"FAT") && label(43, 11).as_deref() == Some("cidata") {
            return Some("vfat");
        }
        if head.get(82..87) == Some(b"FAT32") && label(71, 11).as_deref() == Some("cidata") {
            return Some("vfat");
        }
    }
    None
}

/// Finds a seed disk, mounts it read-only on `mountpoint` for as long as it takes to read it,
/// and returns what it says. Problems are said on the console, and the seed is then ignored.
pub fn read(mountpoint: &Path) -> Option<Seed> {
    let (dev, fstype) = stage1::block_devices().into_iter().find_map(|dev| {
        let head = stage1::read_head(&dev, 34 * 1024).ok()?;
        Some((dev, seed_type(&head)?))
    })?;
    if let Err(e) = std::fs::create_dir_all(mountpoint) {
        eprintln!("flotilla-agent: ignoring the seed {}: cannot create {}: {e}", dev.display(), mountpoint.display());
        return None;
    }
    if let Err(e) = sys::mount(&dev.to_string_lossy(), mountpoint, Some(fstype), libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None) {
        eprintln!("flotilla-agent: ignoring the seed {}: cannot mount it ({fstype}): {e}", dev.display());
        return None;
    }
    let text = |name: &str| std::fs::read_to_string(mountpoint.join(name)).unwrap_or_default();
    let (meta, network) = (text("meta-data"), text("network-config"));
    let _ = sys::umount(mountpoint, 0);
    let seed = parse(&meta, &network);
    eprintln!("flotilla-agent: seed {} ({fstype}): hostname {:?}, network {:?}", dev.display(), seed.hostname, seed.network.as_ref().map(ToString::to_string));
    Some(seed)
}

/// `key: value` of a YAML line, unquoted.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.trim().trim_start_matches("- ").split_once(':')?;
    Some((k.trim(), v.trim().trim_matches(|c| c == '"' || c == '\'')))
}

/// One item of a `routes:` list: version 2's `to`/`via`, version 1's `network`/`netmask`/`gateway`.
#[derive(Debug, Default)]
struct Route {
    to: Option<String>,
    netmask: Option<String>,
    via: Option<String>,
}

impl Route {
    fn set(&mut self, key: &str, value: &str) {
        let slot = match key {
            "to" | "network" => &mut self.to,
            "netmask" => &mut self.netmask,
            "via" | "gateway" => &mut self.via,
            _ => return,
        };
        *slot = Some(value.to_owned());
    }

    /// The gateway, when this is the default route (`to: default`, `to: 0.0.0.0/0`, or
    /// `network: 0.0.0.0` with no netmask or `netmask: 0.0.0.0`).
    fn default_gateway(self) -> Option<std::net::Ipv4Addr> {
        let default = match self.to.as_deref()? {
            "default" | "0.0.0.0/0" => true,
            "0.0.0.0" => self.netmask.as_deref().is_none_or(|m| m == "0.0.0.0" || m == "0"),
            _ => false,
        };
        if default {
            self.via?.parse().ok()
        } else {
            None
        }
    }
}

/// Reads meta-data and network-config.
pub fn parse(meta: &str, network: &str) -> Seed {
    let hostname = meta.lines().filter_map(key_value).find(|(k, _)| *k == "local-hostname").map(|(_, v)| v.to_owned()).filter(|v| !v.is_empty());
    let (mut addr, mut netmask_prefix, mut gateway, mut dhcp) = (None, None, None, false);
    let mut in_addresses = false;
    // A `routes:` list (its indentation, and the item being read): its keys are the routes',
    // not the interface's, and its default route gives the gateway.
    let mut routes: Option<(usize, Route)> = None;
    for line in network.lines() {
        let trimmed = line.trim();
        if let Some((indent, route)) = &mut routes {
            let depth = line.len() - line.trim_start().len();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if depth > *indent || (depth == *indent && trimmed.starts_with("- ")) {
                if trimmed.starts_with("- ") {
                    gateway = gateway.or(std::mem::take(route).default_gateway());
                }
                if let Some((k, v)) = key_value(line) {
                    route.set(k, v);
                }
                continue;
            }
            gateway = gateway.or(std::mem::take(route).default_gateway());
            routes = None;
        }
        if in_addresses {
            // Version 2: `addresses:` followed by `- 10.0.0.2/24` items (or `[10.0.0.2/24]`).
            if let Some(item) = trimmed.strip_prefix("- ") {
                if addr.is_none() {
                    addr = parse_cidr(item.trim_matches(|c| c == '"' || c == '\'')).ok();
                }
                continue;
            }
            in_addresses = false;
        }
        let Some((k, v)) = key_value(line) else { continue };
        match k {
            "routes" if v.is_empty() => routes = Some((line.len() - line.trim_start().len(), Route::default())),
            "addresses" if v.is_empty() => in_addresses = true,
            "addresses" => addr = addr.or_else(|| parse_cidr(v.trim_matches(|c| c == '[' || c == ']').split(',').next().unwrap_or("").trim()).ok()),
            // Version 1: `address: 10.0.0.2/24` or `address: 10.0.0.2` with `netmask:`.
            "address" => addr = addr.or_else(|| parse_cidr(v).ok().or_else(|| Some((v.parse().ok()?, 32)))),
            "netmask" => netmask_prefix = v.parse::<std::net::Ipv4Addr>().ok().map(|m| u32::from(m).count_ones() as u8),
            "gateway" | "gateway4" => gateway = v.parse().ok(),
            "dhcp4" if v == "true" || v == "yes" => dhcp = true,
            "type" if v == "dhcp" || v == "dhcp4" => dhcp = true,
            _ => {}
        }
    }
    if let Some((_, route)) = routes {
        gateway = gateway.or(route.default_gateway());
    }
    let network = match addr {
        Some((addr, prefix)) => Some(Network::Static { addr, prefix: if prefix == 32 { netmask_prefix.unwrap_or(32) } else { prefix }, gateway }),
        None if dhcp => Some(Network::Dhcp),
        None => None,
    };
    Seed { hostname, network }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn seed_reads_hostname_and_both_network_config_versions() {
        let v2 = "version: 2\nethernets:\n  eth0:\n    addresses:\n      - 192.168.1.10/24\n    gateway4: 192.168.1.1\n";
        let s = parse("instance-id: i-1\nlocal-hostname: seeded\n", v2);
        assert_eq!(s.hostname.as_deref(), Some("seeded"));
        let want = Network::Static { addr: Ipv4Addr::new(192, 168, 1, 10), prefix: 24, gateway: Some(Ipv4Addr::new(192, 168, 1, 1)) };
        assert_eq!(s.network, Some(want.clone()));
        let v1 = "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: static\n        address: 192.168.1.10\n        netmask: 255.255.255.0\n        gateway: 192.168.1.1\n";
        assert_eq!(parse("", v1).network, Some(want));
        assert_eq!(parse("", "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n").network, Some(Network::Dhcp));
        assert_eq!(parse("", "").network, None);
    }

    #[test]
    fn seed_takes_the_gateway_from_a_default_route_in_either_version() {
        let want = Some(Network::Static { addr: Ipv4Addr::new(10, 0, 2, 15), prefix: 24, gateway: Some(Ipv4Addr::new(10, 0, 2, 2)) });
        // Netplan's current form (gateway4 is deprecated); a route that is not the default is no gateway.
        let v2 = "version: 2\nethernets:\n  eth0:\n    addresses:\n      - 10.0.2.15/24\n    routes:\n      - to: 192.168.7.0/24\n        via: 10.0.2.7\n      - via: 10.0.2.2\n        to: default\n    nameservers:\n      addresses: [10.0.2.3]\n";
        assert_eq!(parse("", v2).network, want);
        let last = "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    routes:\n      - to: 0.0.0.0/0\n        via: 10.0.2.2\n";
        assert_eq!(parse("", last).network, want);
        let other = "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    routes:\n      - to: 192.168.7.0/24\n        via: 10.0.2.7\n";
        assert_eq!(parse("", other).network, Some(Network::Static { addr: Ipv4Addr::new(10, 0, 2, 15), prefix: 24, gateway: None }));
        // Version 1: a subnet's routes have their own netmask, which is not the subnet's.
        let v1 = "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: static\n        address: 10.0.2.15\n        netmask: 255.255.255.0\n        routes:\n          - network: 0.0.0.0\n            netmask: 0.0.0.0\n            gateway: 10.0.2.2\n";
        assert_eq!(parse("", v1).network, want);
    }

    #[test]
    fn seed_type_knows_vfat_and_iso9660_labels() {
        let mut fat = vec![0u8; 34 * 1024];
        fat[510..512].copy_from_slice(&[0x55, 0xaa]);
        fat[54..59].copy_from_slice(b"FAT16");
        fat[43..54].copy_from_slice(b"CIDATA     ");
        assert_eq!(seed_type(&fat), Some("vfat"));
        fat[43..54].copy_from_slice(b"OTHER      ");
        assert_eq!(seed_type(&fat), None);
        let mut iso = vec![0u8; 34 * 1024];
        iso[32769..32774].copy_from_slice(b"CD001");
        iso[32808..32840].copy_from_slice(format!("{:<32}", "cidata").as_bytes());
        assert_eq!(seed_type(&iso), Some("iso9660"));
    }
}
