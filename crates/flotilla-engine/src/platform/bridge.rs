//! The deployment's bridge, shared by its local containers and its VMs: one subnet, the
//! bridge holding its first address, in the network namespace flotilla runs in. Each
//! machine plugs its own link into it (a container's veth, a VM's tap).

use sha2::{Digest, Sha256};
use std::process::{Command, Stdio};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::Value;

use super::{Context, PlatformError};
use crate::facts::Subnet;

/// Serialises changes to the deployment's bridge between machines worked on in parallel (the
/// deployment lock keeps other processes out).
pub(super) static NETWORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The first four bytes of a SHA-256 of `parts`, in hex: short names that differ per state DB.
pub(super) fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// What names the deployment's network objects: a hash of the state DB's path and the
/// deployment's name, so two state DBs (two users, parallel tests) never share a name.
pub(super) fn deployment_id(ctx: &Context) -> String {
    short_hash(&[&ctx.state_path.to_string_lossy(), &ctx.deployment])
}

/// The deployment's bridge.
pub(super) fn name(ctx: &Context) -> String {
    format!("flb-{}", deployment_id(ctx))
}

/// Runs `ip ARGS` for machine `machine`; its output, or why it failed.
pub(super) fn ip(machine: &str, args: &[&str]) -> Result<String, PlatformError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PlatformError::failed(machine, format!("cannot run `ip` ({e}); install iproute2")))?;
    if !out.status.success() {
        return Err(PlatformError::failed(machine, format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `commands` in one `ip -json -batch` (in network namespace `netns`, if given) and
/// returns every JSON document they printed, in order: a machine's plumbing read in one
/// process rather than one process a link. A command about a link that does not exist prints
/// nothing and the others still run (`-force`); any other failure is an error.
pub(super) fn ip_batch(machine: &str, netns: Option<&str>, commands: &[String]) -> Result<Vec<serde_json::Value>, PlatformError> {
    use std::io::Write as _;
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-force", "-json", "-batch", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| PlatformError::failed(machine, format!("cannot run `ip` ({e}); install iproute2")))?;
    let script: String = commands.iter().map(|c| format!("{c}\n")).collect();
    // The script is a few hundred bytes: it fits the pipe, so writing it all before reading
    // cannot block on `ip` writing its answer.
    let written = child.stdin.take().expect("piped").write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(|e| PlatformError::failed(machine, format!("`ip -batch` failed: {e}")))?;
    // `ip`'s own words first: one that could not enter the namespace exits before it reads.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tolerated = |l: &str| l.starts_with("Command failed") || (l.starts_with("Device \"") && l.ends_with("does not exist."));
    let unexpected: Vec<&str> = stderr.lines().filter(|l| !tolerated(l)).collect();
    // Failing with only missing links said is the one failure expected; anything else
    // (other words, or none at all: a signal) is `ip`'s error.
    if !out.status.success() && (!unexpected.is_empty() || stderr.trim().is_empty()) {
        let why = if unexpected.is_empty() { out.status.to_string() } else { unexpected.join("; ") };
        return Err(PlatformError::failed(machine, format!("`ip -batch` of `{}` failed: {why}", commands.join("; "))));
    }
    written.map_err(|e| PlatformError::failed(machine, format!("cannot give `ip -batch` its commands: {e}")))?;
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PlatformError::failed(machine, format!("`ip -json -batch` printed what is not JSON: {e}")))
}

/// Whether this network namespace has a link `name`.
pub(super) fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes the bridge if the deployment has none yet; true when it was made. Refuses a subnet
/// another interface already routes, which would make the machines unreachable. Call with
/// [`NETWORK`] held.
pub(super) fn ensure(machine: &str, bridge: &str, subnet: &Subnet) -> Result<bool, PlatformError> {
    if link_exists(bridge) {
        return Ok(false);
    }
    let gateway = subnet.gateway();
    for line in ip(machine, &["-o", "-4", "addr", "show"])?.lines() {
        let mut words = line.split_whitespace();
        let (Some(_), Some(dev)) = (words.next(), words.next()) else { continue };
        let Some(cidr) = words.skip_while(|w| *w != "inet").nth(1) else { continue };
        let Some(other) = Subnet::parse(cidr) else { continue };
        if other.overlaps(subnet) {
            return Err(PlatformError::refused(
                machine,
                format!(
                    "option `platform.subnet` is {subnet} but interface {dev} already has {cidr} on this host; pick a free subnet for the deployment, e.g. platform.subnet = \"10.232.0.0/24\""
                ),
            ));
        }
    }
    ip(machine, &["link", "add", bridge, "type", "bridge"])?;
    let made = (|| {
        ip(machine, &["addr", "add", &format!("{gateway}/{}", subnet.prefix), "dev", bridge])?;
        ip(machine, &["link", "set", bridge, "up"])
    })();
    if let Err(e) = made {
        let _ = ip(machine, &["link", "del", bridge]);
        return Err(e);
    }
    Ok(true)
}

/// Deletes the bridge when no port is left on it (the last machine out). Call with
/// [`NETWORK`] held.
pub(super) fn remove_if_unused(machine: &str, bridge: &str) -> Result<(), PlatformError> {
    if link_exists(bridge) && ip(machine, &["-o", "link", "show", "master", bridge])?.trim().is_empty() {
        ip(machine, &["link", "del", bridge])?;
    }
    Ok(())
}

/// Machine `name`'s place on the bridge: its planned address (fact `ip`) and the subnet
/// `subnet` (its `platform.subnet`).
pub(super) fn place(name: &str, subnet: &str, facts: &BTreeMap<String, Value>) -> Result<(Ipv4Addr, Subnet), PlatformError> {
    let err = |message: String| PlatformError::failed(name, message);
    let ip = facts
        .get("ip")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err("it has no address yet; deploy it (flotilla deploy) to provision it".into()))?;
    let subnet = Subnet::parse(subnet).ok_or_else(|| err(format!("option `platform.subnet` is not a subnet: {subnet}")))?;
    Ok((ip, subnet))
}
