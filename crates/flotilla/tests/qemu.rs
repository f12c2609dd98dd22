//! The `qemu` platform's boots, through the real CLI: a VM boots the kernel, initrd and
//! parameters of the generation it runs (a reboot after a change, a reboot after a rollback),
//! a VM whose kernel does not boot fails that machine alone with the console's last lines,
//! and `flotilla logs --console` shows a machine's console.
//!
//! Real components: real Nix with the demo package set (its `linux` is Debian's cloud kernel,
//! `linux_alt` the same kernel under another store path with a marker after its bzImage),
//! the real agent, QEMU under TCG (this host's KVM hangs guests). Every flotilla command runs
//! in the test's own network namespace (`Fleet`).

mod common;

use std::path::{Path, PathBuf};

use common::{row, Fleet, Run};

#[track_caller]
fn ok(r: Run, what: &str) -> Run {
    assert_eq!(r.code(), 0, "{what} failed\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    r
}

/// One VM `vm` booting `kernel` with `params` as its `boot.kernelParams`, with a file of
/// the generation so each change is one.
fn vm_deployment(kernel: &str, params: &[&str]) -> String {
    let params: String = params.iter().map(|p| format!("{p:?} ")).collect();
    format!(
        r#"{{ meta.name = "qemutest"; machines.vm = {{ pkgs, ... }}: {{
    platform = {{ type = "qemu"; memory = 256; accel = "tcg"; }};
    boot.kernel = pkgs.{kernel};
    boot.kernelParams = [ {params}];
    packages = [ pkgs.busybox ];
  }}; }}
"#
    )
}

/// The VM's kernel command line, read inside it.
fn cmdline(f: &Fleet, file: &str) -> String {
    ok(f.run(&["exec", "-f", file, "vm", "--", "cat", "/proc/cmdline"]), "exec cat /proc/cmdline").stdout().trim().to_owned()
}

/// The `flotilla.system=` of a command line.
fn system_of(cmdline: &str) -> &str {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("flotilla.system=")).unwrap_or_else(|| panic!("no flotilla.system= in {cmdline:?}"))
}

/// The toplevel of each generation of `vm`, by number, and the current one's number.
fn generations(f: &Fleet, file: &str) -> (Vec<(u64, String)>, u64) {
    let gens = ok(f.run(&["generations", "-f", file, "vm", "--json"]), "generations").json();
    let all: Vec<(u64, String)> = gens.as_array().unwrap().iter().map(|g| (g["number"].as_u64().unwrap(), absolute(g["toplevel"].as_str().unwrap()))).collect();
    let current: Vec<u64> = gens.as_array().unwrap().iter().filter(|g| g["current"] == true).filter_map(|g| g["number"].as_u64()).collect();
    assert_eq!(current.len(), 1, "one current generation: {gens:#}");
    (all, current[0])
}

fn absolute(store_path: &str) -> String {
    if store_path.starts_with('/') {
        store_path.to_owned()
    } else {
        format!("/nix/store/{store_path}")
    }
}

fn toplevel(gens: &[(u64, String)], n: u64) -> String {
    gens.iter().find(|(g, _)| *g == n).unwrap_or_else(|| panic!("no generation {n} in {gens:?}")).1.clone()
}

/// The kernel image QEMU boots the machine with: `boot/current/kernel` beside its disk.
fn booted_kernel(f: &Fleet, file: &str) -> Vec<u8> {
    let m = f.machine(file, "vm");
    let disk = m["resources"]["disk"].as_str().unwrap_or_else(|| panic!("a VM has a disk: {m:#}"));
    let kernel: PathBuf = Path::new(disk).with_file_name("boot/current/kernel");
    std::fs::read(&kernel).unwrap_or_else(|e| panic!("cannot read {}: {e}", kernel.display()))
}

/// The bzImage of a generation, in the host's store (`<toplevel>/kernel`).
fn kernel_of(top: &str) -> Vec<u8> {
    std::fs::read(Path::new(top).join("kernel")).unwrap_or_else(|e| panic!("cannot read {top}/kernel: {e}"))
}

/// Items 1 and 2 on one VM (each TCG boot costs seconds): a change of the kernel parameters
/// takes effect at the next reboot, a kernel change boots the new kernel, and a rollback
/// followed by a reboot boots the old generation's kernel and parameters again.
#[test]
fn a_vm_reboots_into_the_kernel_and_parameters_of_the_generation_it_runs() {
    let f = Fleet::new();
    let t0 = std::time::Instant::now();

    // Generation 1: pkgs.linux, no parameters of its own.
    let v1 = f.fl.file("qemutest.nix", &vm_deployment("linux", &[]));
    let (code, report, out) = f.deploy_json(&["-f", &v1]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "vm")["outcome"], "deployed", "{report:#}");
    let (gens, current) = generations(&f, &v1);
    assert_eq!(current, 1);
    let gen1 = toplevel(&gens, 1);
    let line = cmdline(&f, &v1);
    assert_eq!(system_of(&line), gen1, "{line}");
    assert!(!line.contains("flotilla.test=two"), "{line}");
    assert_eq!(booted_kernel(&f, &v1), kernel_of(&gen1));
    eprintln!("generation 1 deployed and checked: {:?}", t0.elapsed());

    // Generation 2: new parameters. The running kernel keeps its command line until a reboot.
    let v2 = f.fl.file("qemutest.nix", &vm_deployment("linux", &["flotilla.test=two"]));
    let (code, report, out) = f.deploy_json(&["-f", &v2]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "vm")["outcome"], "deployed", "{report:#}");
    let (gens, current) = generations(&f, &v2);
    assert_eq!(current, 2);
    let gen2 = toplevel(&gens, 2);
    assert_ne!(gen1, gen2);
    let line = cmdline(&f, &v2);
    assert_eq!(system_of(&line), gen1, "before a reboot the kernel runs with generation 1's command line: {line}");
    assert!(!line.contains("flotilla.test=two"), "{line}");
    ok(f.run(&["reboot", "-f", &v2, "--on", "vm"]), "reboot");
    let line = cmdline(&f, &v2);
    assert_eq!(system_of(&line), gen2, "after a reboot, generation 2's: {line}");
    assert!(line.split_whitespace().any(|w| w == "flotilla.test=two"), "{line}");
    eprintln!("generation 2 booted: {:?}", t0.elapsed());

    // Generation 3: another kernel (linux_alt: the bzImage with a marker after it).
    let v3 = f.fl.file("qemutest.nix", &vm_deployment("linux_alt", &["flotilla.test=two"]));
    let (code, report, out) = f.deploy_json(&["-f", &v3]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "vm")["outcome"], "deployed", "{report:#}");
    let (gens, current) = generations(&f, &v3);
    assert_eq!(current, 3);
    let gen3 = toplevel(&gens, 3);
    assert_ne!(kernel_of(&gen2), kernel_of(&gen3), "linux_alt's bzImage differs from linux's, so the bytes tell which one QEMU got");
    ok(f.run(&["reboot", "-f", &v3, "--on", "vm"]), "reboot");
    let line = cmdline(&f, &v3);
    assert_eq!(system_of(&line), gen3, "after a reboot, generation 3's: {line}");
    assert!(booted_kernel(&f, &v3) == kernel_of(&gen3), "QEMU was given generation 3's kernel");
    eprintln!("generation 3 (linux_alt) booted: {:?}", t0.elapsed());

    // Rollback: generation 2 again, and its kernel at the next boot.
    ok(f.run(&["rollback", "-f", &v3, "--on", "vm"]), "rollback");
    assert_eq!(generations(&f, &v3).1, 2);
    assert!(booted_kernel(&f, &v3) == kernel_of(&gen2), "after the rollback the VM's next boot is generation 2's kernel");
    ok(f.run(&["reboot", "-f", &v3, "--on", "vm"]), "reboot");
    let line = cmdline(&f, &v3);
    assert_eq!(system_of(&line), gen2, "after a rollback and a reboot, generation 2's command line: {line}");
    assert!(line.split_whitespace().any(|w| w == "flotilla.test=two"), "{line}");
    assert!(booted_kernel(&f, &v3) == kernel_of(&gen2), "QEMU was given generation 2's kernel, not linux_alt");
    eprintln!("rolled back and rebooted: {:?}", t0.elapsed());
}

/// A local container `web` serving a page, and a VM `vm` whose kernel parameters name a
/// root filesystem that does not exist (the machine's `root=` comes after the platform's, and
/// stage 1 takes the last): stage 1 gives up after its wait and powers off.
fn broken_vm_deployment() -> String {
    r#"{ meta.name = "qemubroken"; machines.web = { pkgs, ... }: let
    site = pkgs.runCommand "site" { } ''
      mkdir $out
      echo web-serves > $out/index.html
    '';
  in {
    packages = [ pkgs.busybox ];
    services.httpd = {
      command = [ "${pkgs.busybox}/bin/httpd" "-f" "-p" "8080" "-h" "${site}" ];
      healthCheck = { http = "http://127.0.0.1:8080/"; interval = 1; retries = 5; timeout = 2; };
    };
  };
  machines.vm = { pkgs, ... }: {
    platform = { type = "qemu"; memory = 256; accel = "tcg"; };
    boot.kernel = pkgs.linux;
    boot.kernelParams = [ "root=LABEL=nosuchroot" ];
    packages = [ pkgs.busybox ];
  }; }
"#
    .into()
}

/// Items 3 and 4: the VM that does not boot fails alone, its reason quoting the console, its
/// console kept for `logs --console`, no QEMU left; a local machine's console is shown too,
/// and a machine that never booted says so.
#[test]
fn a_vm_whose_kernel_does_not_boot_fails_alone_with_the_console_in_the_reason() {
    let f = Fleet::new();
    let file = f.fl.file("qemubroken.nix", &broken_vm_deployment());
    let t0 = std::time::Instant::now();

    // The local machine first: the VM is part of the deployment but has never booted, and
    // `logs --console` says so.
    let (code, report, out) = f.deploy_json(&["-f", &file, "--on", "web"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["outcome"], "deployed", "{report:#}");
    let r = f.run(&["logs", "-f", &file, "vm", "--console"]);
    assert_ne!(r.code(), 0, "logs --console on a VM never booted fails\nstdout:\n{}", r.stdout());
    assert!(r.stderr().contains("vm") && r.stderr().contains("not booted"), "{}", r.stderr());

    let (code, report, out) = f.deploy_json(&["-f", &file]);
    eprintln!("deploy took {:?}", t0.elapsed());
    assert_ne!(code, 0, "a machine failed, so the deploy fails\n{out}");
    assert_eq!(row(&report, "web")["outcome"], "unchanged", "{report:#}");
    let vm = row(&report, "vm");
    assert_eq!(vm["outcome"], "failed", "{report:#}");
    assert_eq!(vm["failed_phase"], "provision", "{report:#}");
    let reason = vm["error"].as_str().unwrap_or_else(|| panic!("a failed row has a reason: {report:#}"));
    assert!(reason.contains("flotilla stage1:") && reason.contains("nosuchroot"), "the reason quotes stage 1 on the console: {reason}");

    // The local machine serves.
    let web = f.machine(&file, "web");
    let ip = web["ip"].as_str().expect("a local machine has an address");
    assert_eq!(f.http_get(&format!("http://{ip}:8080/")).as_deref().map(str::trim), Some("web-serves"));

    // The VM's console is still there to read, and no QEMU of it runs.
    let r = ok(f.run(&["logs", "-f", &file, "vm", "--console"]), "logs vm --console");
    assert!(r.stdout().contains("flotilla stage1:") && r.stdout().contains("nosuchroot"), "{}", r.stdout());
    let qemus = f.host(&["sh", "-c", "ps -eo args | grep '^qemu-system' | grep -c 'flotilla-vm ' || true"]);
    let state = f.fl.dir.path().join("state");
    let ours = f.host(&["sh", "-c", &format!("ps -eo args | grep '^qemu-system' | grep -c -F '{}' || true", state.display())]);
    assert_eq!(ours.stdout().trim(), "0", "no QEMU of this test's VM is left running ({} flotilla-vm QEMUs on the host)", qemus.stdout().trim());

    // A local machine's console is shown too.
    let r = ok(f.run(&["logs", "-f", &file, "web", "--console"]), "logs web --console");
    assert!(r.stdout().contains("flotilla-agent container: web started"), "the local machine's console: {}", r.stdout());

    // Destroy leaves nothing of the VM.
    let vm_dir = state.join("machines/qemubroken/vm");
    ok(f.run(&["destroy", "-f", &file, "--yes"]), "destroy");
    assert!(!vm_dir.exists(), "destroy removed {}", vm_dir.display());
    let ours = f.host(&["sh", "-c", &format!("ps -eo args | grep '^qemu-system' | grep -c -F '{}' || true", state.display())]);
    assert_eq!(ours.stdout().trim(), "0");
    eprintln!("done: {:?}", t0.elapsed());
}

/// A VM serving a page on port 80, forwarded from 127.0.0.1:`port` of the test's namespace.
fn forwarded_vm_deployment(port: u16) -> String {
    format!(
        r#"{{ meta.name = "qemufwd"; machines.vm = {{ pkgs, ... }}: {{
    platform = {{ type = "qemu"; memory = 256; accel = "tcg"; forwardPorts = [ {{ host = {port}; guest = 80; }} ]; }};
    boot.kernel = pkgs.linux;
    packages = [ pkgs.busybox ];
    services.httpd.command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{pkgs.writeTextDir "index.html" "forwarded"}}" ];
  }}; }}
"#
    )
}

#[test]
fn a_vms_forwarded_port_answers_is_restored_and_a_taken_one_fails_its_start_whole() {
    let f = Fleet::new();
    let port = common::free_port();
    let file = f.fl.file("fwd.nix", &forwarded_vm_deployment(port));
    let url = format!("http://127.0.0.1:{port}/");
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{report:#}\n{out}");
    assert_eq!(f.http_get(&url).as_deref().map(str::trim), Some("forwarded"));

    // The relay killed behind flotilla's back: `info` says so, `start` puts it back.
    let relay: u32 = f.machine(&file, "vm")["resources"]["forward pid"].as_str().expect("a relay runs").parse().unwrap();
    assert!(common::alive(relay));
    f.host(&["kill", "-9", &relay.to_string()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while common::alive(relay) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let vm = f.machine(&file, "vm");
    assert!(vm["problems"].to_string().contains("its port forwards' relay is gone"), "{vm:#}");
    ok(f.run(&["start", "-f", &file, "--on", "vm"]), "start");
    assert_eq!(f.http_get(&url).as_deref().map(str::trim), Some("forwarded"));

    // Stopped, the relay goes with the VM; a port someone else took fails the start, and
    // nothing of it runs.
    let relay: u32 = f.machine(&file, "vm")["resources"]["forward pid"].as_str().expect("a relay runs again").parse().unwrap();
    ok(f.run(&["stop", "-f", &file, "--on", "vm"]), "stop");
    assert!(!common::alive(relay), "the relay outlived its VM");
    let mut squatter = f
        .in_ns_command(&["python3", "-c", &format!("import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)")])
        .spawn()
        .expect("python3 runs");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = f.run(&["start", "-f", &file, "--on", "vm"]);
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_ne!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    let said = format!("{}{}", r.stdout(), r.stderr());
    assert!(said.contains("cannot forward its ports") && said.contains(&format!("127.0.0.1:{port}")), "{said}");
    assert_eq!(f.machine(&file, "vm")["state"], "stopped", "a VM whose forwards failed is not left running");
    ok(f.run(&["start", "-f", &file, "--on", "vm"]), "start once the port is free");
    assert_eq!(f.http_get(&url).as_deref().map(str::trim), Some("forwarded"));
}
