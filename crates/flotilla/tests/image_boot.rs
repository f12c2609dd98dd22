//! A disk image boots on its own (issue 15): `flotilla image --format qcow2` of a machine with
//! `boot.kernel`, booted by `qemu-system-x86_64` as a user would boot it (no flotilla in the
//! loop) with a cloud-init NoCloud seed, runs the machine's services from generation 1 and
//! takes its hostname and address from the seed. QEMU's user-mode network forwards a port of
//! 127.0.0.1 to the guest's port 80; QEMU and curl run in a network namespace of this test's
//! own, so even that loopback forward is the test's. Every prerequisite missing fails loudly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Fl;

/// Fails loudly when something the boot needs is missing.
fn require_tools() {
    common::require_container_prerequisites();
    for (tool, arg, package) in [
        ("qemu-system-x86_64", "--version", "qemu-system-x86"),
        ("mkfs.vfat", "--help", "dosfstools"),
        ("mcopy", "--version", "mtools"),
    ] {
        let ran = Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(ran, "prerequisite missing: {tool} (Debian: {package}); run scripts/install-deps.sh");
    }
    let cache = std::env::var("FLOTILLA_DEMO_CACHE").unwrap_or_else(|_| "/var/cache/flotilla/demo".into());
    assert!(Path::new(&cache).join("linux/package").exists(), "prerequisite missing: the demo kernel in {cache}/linux; run scripts/install-deps.sh");
}

/// Machine `web`: busybox's httpd on port 80 serving `page`, and a CGI script answering the
/// hostname the running machine has.
fn deployment(page: &str) -> String {
    r#"{ meta.name = "imageboot"; machines.web = { pkgs, ... }: let
    site = pkgs.runCommand "site" {} ''
      mkdir -p $out/cgi-bin
      echo 'PAGE' > $out/index.html
      printf '#!${pkgs.busybox}/bin/sh\necho Content-Type: text/plain\necho\nexec ${pkgs.busybox}/bin/hostname\n' > $out/cgi-bin/hostname
      chmod +x $out/cgi-bin/hostname
    '';
  in {
    boot.kernel = pkgs.linux;
    packages = [ pkgs.busybox ];
    services.httpd.command = [ "${pkgs.busybox}/bin/httpd" "-f" "-p" "80" "-h" "${site}" ];
  }; }
"#
    .replace("PAGE", page)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-deps.sh)"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A NoCloud seed as a user makes one: a vfat filesystem labelled CIDATA holding meta-data
/// and network-config (version 2, the address QEMU's user network expects, the default route
/// in netplan's current `routes:` form).
fn make_seed(dir: &Path, network_config: &str) -> PathBuf {
    let seed = dir.join("seed.img");
    std::fs::write(dir.join("meta-data"), "instance-id: imageboot-1\nlocal-hostname: seeded-web\n").unwrap();
    std::fs::write(dir.join("network-config"), network_config).unwrap();
    run(Command::new("mkfs.vfat").args(["-n", "CIDATA", "-C"]).arg(&seed).arg("1024"));
    for file in ["meta-data", "network-config"] {
        run(Command::new("mcopy").arg("-i").arg(&seed).arg(dir.join(file)).arg(format!("::{file}")));
    }
    seed
}

/// QEMU in a network namespace of the test's own; QEMU killed, the namespace deleted and the
/// image's store path deleted when dropped, whatever happened.
struct Booted {
    ns: String,
    qemu: Option<Child>,
    console: PathBuf,
    store_path: Option<String>,
}

impl Booted {
    fn new(ns: String) -> Booted {
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(Command::new("ip").args(["netns", "add", &ns]));
        let b = Booted { ns, qemu: None, console: PathBuf::new(), store_path: None };
        run(Command::new("ip").args(["-n", &b.ns, "link", "set", "lo", "up"]));
        b
    }

    /// `argv` inside the namespace (nsenter execs it: the child is the program itself).
    fn in_ns(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg("--").args(argv);
        c
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// GET `path` from 127.0.0.1:`port` inside the namespace, until `deadline`.
    fn get(&mut self, port: u16, path: &str, deadline: Instant) -> String {
        let url = format!("http://127.0.0.1:{port}{path}");
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(qemu) = self.qemu.as_mut() {
                if let Some(status) = qemu.try_wait().unwrap() {
                    panic!("QEMU exited ({status}) before {url} answered; console:\n{}", self.console());
                }
            }
            let out = self.in_ns(&["curl", "-sSf", "--max-time", "5", &url]).output().unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{url} did not answer in time (last: {last}); console:\n{}", self.console());
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        if let Some(p) = &self.store_path {
            let _ = Command::new("nix-store").args(["--delete", p]).output();
        }
    }
}

/// The issue's "done when": the qcow2 booted standalone with a NoCloud seed serves the
/// machine's page and reports the seed's hostname, and nothing names it `web`.
/// A static address for QEMU's user network, the default route in netplan's `routes:` form.
const STATIC: &str = "version: 2\nethernets:\n  eth0:\n    addresses:\n      - 10.0.2.15/24\n    routes:\n      - to: default\n        via: 10.0.2.2\n";

#[test]
fn a_qcow2_image_boots_standalone_with_a_nocloud_seed_and_serves_its_page() {
    let console = boot_with_seed(STATIC);
    assert!(console.contains("flotilla-agent: network 10.0.2.15/24 via 10.0.2.2"), "the seed's network-config (with its default route) was not applied; console:\n{console}");
}

/// A seed asking for DHCP: the system's udhcpc (busybox, in its packages) gets QEMU's user
/// network lease, and the agent, as udhcpc's script, applies it.
#[test]
fn a_qcow2_image_takes_its_address_from_dhcp_when_its_seed_asks_for_it() {
    let console = boot_with_seed("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n");
    assert!(console.contains("flotilla-agent: network 10.0.2.15 (mask 255.255.255.0) on eth0 from DHCP"), "the DHCP lease was not applied; console:\n{console}");
}

/// Builds the machine's qcow2, boots it with a seed holding `network_config`, checks the page
/// and the hostname through the forwarded port, and returns the console.
fn boot_with_seed(network_config: &str) -> String {
    require_tools();
    let fl = Fl::new();
    let page = format!("imageboot {}", common::random_hex(4));
    let file = fl.file("deployment.nix", &deployment(&page));
    let dir = fl.dir.path().join("images");
    std::fs::create_dir(&dir).unwrap();
    let mut booted = Booted::new(format!("flimg-{}-{}", std::process::id(), common::random_hex(2)));
    let report = fl.run(&["image", "-f", &file, "web", "--format", "qcow2", "-o", &dir.to_string_lossy(), "--json"]).ok().json();
    booted.store_path = report["storePath"].as_str().map(str::to_owned);
    let image = report["path"].as_str().unwrap().to_owned();
    let (kernel, initrd, params) = (report["kernel"].as_str().unwrap(), report["initrd"].as_str().unwrap(), report["kernelParams"].as_str().unwrap());
    assert_eq!(params, "console=ttyS0 root=LABEL=flotilla-root", "{report}");
    assert!(!params.contains("flotilla.hostname") && !params.contains("flotilla.ip"), "the seed must be what configures the machine: {params}");

    let seed = make_seed(fl.dir.path(), network_config);
    let port = common::free_port();
    booted.console = fl.dir.path().join("console.log");
    let started = Instant::now();
    let qemu = booted
        .in_ns(&["qemu-system-x86_64", "-M", "pc", "-accel", "tcg,tb-size=32", "-m", "256", "-nographic", "-nodefaults"])
        .args(["-kernel", kernel, "-initrd", initrd, "-append", params])
        .arg("-drive")
        .arg(format!("file={image},if=virtio,format=qcow2,snapshot=on"))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()))
        .args(["-netdev", &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80"), "-device", "virtio-net-pci,netdev=n0"])
        .arg("-serial")
        .arg(format!("file:{}", booted.console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 starts (run scripts/install-deps.sh)");
    booted.qemu = Some(qemu);

    let deadline = started + Duration::from_secs(120);
    let body = booted.get(port, "/", deadline);
    eprintln!("the page answered {:.1} s after QEMU started", started.elapsed().as_secs_f64());
    assert_eq!(body.trim(), page, "console:\n{}", booted.console());
    let hostname = booted.get(port, "/cgi-bin/hostname", deadline);
    assert_eq!(hostname.trim(), "seeded-web", "the running machine's hostname is not the seed's; console:\n{}", booted.console());

    let console = booted.console();
    assert!(console.contains("flotilla-agent: this machine is seeded-web"), "console:\n{console}");
    let named_web = console.lines().filter(|l| l.contains("this machine is") && !l.contains("this machine is seeded-web")).collect::<Vec<_>>();
    assert!(named_web.is_empty(), "something else named the machine: {named_web:?}");
    console
}
