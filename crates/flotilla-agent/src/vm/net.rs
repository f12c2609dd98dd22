//! A VM's network, set up by its init with ioctls (no `ip` binary on the machine needed): the
//! address and default route the kernel command line gives (`flotilla.ip=ADDR/PREFIX`,
//! `flotilla.gateway=ADDR`), else what a NoCloud seed's network-config says, on the first
//! ethernet interface. The command line wins over the seed.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{sys, Cmdline};

/// How the VM's interface gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A static address.
    Static {
        /// The address.
        addr: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
        /// The default route's gateway.
        gateway: Option<Ipv4Addr>,
    },
    /// DHCP, by the system's `udhcpc`.
    Dhcp,
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::Static { addr, prefix, gateway: Some(g) } => write!(f, "{addr}/{prefix} via {g}"),
            Network::Static { addr, prefix, gateway: None } => write!(f, "{addr}/{prefix}"),
            Network::Dhcp => f.write_str("DHCP"),
        }
    }
}

/// Reads `ADDR/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = s.split_once('/').ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX (e.g. 10.0.0.2/24)"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} in {s:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{prefix:?} in {s:?} is not a prefix length from 0 to 32"))?;
    Ok((addr, prefix))
}

/// The netmask of a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) })
}

impl Network {
    /// The command line's network, else the seed's, else none.
    pub fn choose(cmdline: &Cmdline, seed: Option<&Network>) -> Result<Option<Network>, String> {
        let Some(ip) = &cmdline.ip else { return Ok(seed.cloned()) };
        let (addr, prefix) = parse_cidr(ip).map_err(|e| format!("flotilla.ip: {e}"))?;
        let gateway = match &cmdline.gateway {
            Some(g) => Some(g.parse().map_err(|_| format!("flotilla.gateway: {g:?} is not an IPv4 address"))?),
            None => None,
        };
        Ok(Some(Network::Static { addr, prefix, gateway }))
    }

    /// Configures the first ethernet interface (waiting up to 5 s for it to appear).
    pub fn apply(&self) -> std::io::Result<()> {
        let iface = wait_for_interface(Duration::from_secs(5))?;
        match self {
            Network::Static { addr, prefix, gateway } => {
                sys::configure_interface(&iface, Some((*addr, netmask(*prefix))))?;
                if let Some(g) = gateway {
                    sys::add_default_route(*g)?;
                }
                Ok(())
            }
            Network::Dhcp => {
                sys::configure_interface(&iface, None)?;
                let udhcpc = ["/run/current-system/sw/bin/udhcpc", "/nix/var/flotilla/profiles/system/sw/bin/udhcpc"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.exists())
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the seed asks for DHCP and the system has no udhcpc (add busybox to the system's packages)"))?;
                // udhcpc runs its script on each event; the script is this agent (see
                // [`dhcp_script`]), which applies the lease with the same ioctls as above.
                let me = std::env::current_exe()?;
                let status = std::process::Command::new(udhcpc)
                    .args(["-i", &iface, "-q", "-n", "-t", "5", "-s"])
                    .arg(&me)
                    .env(DHCP_SCRIPT_ENV, "1")
                    .status()?;
                if status.success() {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("udhcpc on {iface} got no lease ({status})")))
                }
            }
        }
    }
}

/// Set in udhcpc's environment, which its script inherits: this agent, run as that script.
pub const DHCP_SCRIPT_ENV: &str = "FLOTILLA_DHCP_SCRIPT";

/// This agent as udhcpc's script (`udhcpc -s`): `EVENT` is udhcpc's first argument, the lease
/// in its environment (`interface`, `ip`, `subnet`, `router`). `bound` and `renew` configure the
/// interface and the default route; `deconfig` leaves the link up without an address.
pub fn dhcp_script(event: &str) -> std::io::Result<()> {
    let var = |k: &str| std::env::var(k).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("udhcpc gave no `{k}`")));
    let iface = var("interface")?;
    match event {
        "bound" | "renew" => {
            let parse = |k: &str, v: String| v.parse::<Ipv4Addr>().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("udhcpc's `{k}` is not an address: {v:?}")));
            let ip = parse("ip", var("ip")?)?;
            let mask = parse("subnet", var("subnet").unwrap_or_else(|_| "255.255.255.0".into()))?;
            sys::configure_interface(&iface, Some((ip, mask)))?;
            if let Some(router) = std::env::var("router").ok().and_then(|r| r.split_whitespace().next().map(str::to_owned)) {
                sys::add_default_route(parse("router", router)?)?;
            }
            eprintln!("flotilla-agent: network {ip} (mask {mask}) on {iface} from DHCP");
            Ok(())
        }
        "deconfig" => sys::configure_interface(&iface, None),
        _ => Ok(()),
    }
}

/// `eth0`, or the first interface other than `lo` in /sys/class/net.
fn wait_for_interface(patience: Duration) -> std::io::Result<String> {
    let deadline = Instant::now() + patience;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n != "lo").collect();
        names.sort();
        if let Some(n) = names.iter().find(|n| *n == "eth0").or(names.first()) {
            return Ok(n.clone());
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the machine has no network interface (is a virtio-net device attached?)"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_from_the_command_line_wins_over_the_seed() {
        let c = Cmdline::parse("flotilla.ip=10.250.0.2/24 flotilla.gateway=10.250.0.1");
        let seed = Network::Dhcp;
        assert_eq!(
            Network::choose(&c, Some(&seed)).unwrap(),
            Some(Network::Static { addr: Ipv4Addr::new(10, 250, 0, 2), prefix: 24, gateway: Some(Ipv4Addr::new(10, 250, 0, 1)) })
        );
        assert_eq!(Network::choose(&Cmdline::default(), Some(&seed)).unwrap(), Some(Network::Dhcp));
        assert!(Network::choose(&Cmdline::parse("flotilla.ip=10.0.0.2"), None).unwrap_err().contains("flotilla.ip"));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
    }
}
