//! The agent's virtio-serial ports: how deployers reach a VM's agent without a network. The
//! platform gives ports named `flotilla.agent.N`; each is served by its own thread, one
//! protocol connection at a time, exactly as a connection to the agent's socket is.
//!
//! A port has no accept: the guest's write blocks until a host client is connected, and a
//! read returns end of file once it left. So each thread opens its port, writes the hello
//! line (which returns once a host client is there), serves one connection, and on end of
//! file closes and reopens the port for the next client. The host reads and drops bytes up
//! to the hello line first: what an earlier client left unread may precede it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_protocol::Connection;

use crate::activate::Agent;

/// The line the agent writes on a port before each connection.
pub const HELLO: &[u8] = b"FLOTILLA-AGENT-HELLO\n";

/// The prefix of the ports the agent serves.
pub const PORT_PREFIX: &str = "flotilla.agent";

/// The agent's ports: (name, device node), from /sys/class/virtio-ports/*/name.
pub fn ports(sys_class: &Path) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(sys_class)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = std::fs::read_to_string(e.path().join("name")).ok()?.trim().to_owned();
            name.starts_with(PORT_PREFIX).then(|| (name, Path::new("/dev").join(e.file_name())))
        })
        .collect();
    found.sort();
    found
}

/// Starts one thread per port of the agent (waiting up to 2 s for the ports to appear);
/// returns their names.
pub fn serve_ports(agent: &Arc<Mutex<Agent>>) -> Vec<String> {
    let sys_class = Path::new("/sys/class/virtio-ports");
    let mut found = ports(sys_class);
    for _ in 0..20 {
        if !found.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        found = ports(sys_class);
    }
    found
        .into_iter()
        .map(|(name, dev)| {
            let agent = Arc::clone(agent);
            let label = name.clone();
            std::thread::spawn(move || serve_port(&agent, &label, &dev));
            name
        })
        .collect()
}

/// Serves the port at `dev` forever, one connection after another.
fn serve_port(agent: &Arc<Mutex<Agent>>, name: &str, dev: &Path) {
    loop {
        if let Err(e) = serve_one(agent, dev) {
            eprintln!("flotilla-agent: port {name}: {e}");
            // A port that fails at once (unplugged) must not spin.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn serve_one(agent: &Arc<Mutex<Agent>>, dev: &Path) -> Result<(), String> {
    let mut port: File = OpenOptions::new().read(true).write(true).open(dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    port.write_all(HELLO).map_err(|e| format!("cannot write the hello line: {e}"))?;
    let reader = port.try_clone().map_err(|e| format!("cannot duplicate {}: {e}", dev.display()))?;
    crate::server::serve_connection(agent, Connection::new(reader, port)).map_err(|e| format!("connection ended: {e}"))
}
