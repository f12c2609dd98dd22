//! The VM options (issue 15): `boot.*`, `image.size` and the qemu platform's own. Bad input
//! ends in one message naming the machine, the option and the fix, exit status 2, nothing
//! built or recorded; good input evaluates with its defaults.

mod common;

use common::{Fl, Run};

fn refused(body: &str) -> Run {
    let fl = Fl::new();
    let file = fl.file("deployment.nix", body);
    let run = fl.run(&["build", "-f", &file]);
    assert_eq!(run.code(), 2, "expected exit 2\nstdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    assert_eq!(fl.run(&["list", "--json"]).ok().json(), serde_json::json!([]));
    run
}

#[track_caller]
fn says(run: &Run, text: &str) {
    assert!(run.stderr().contains(text), "stderr lacks {text:?}:\n{}", run.stderr());
}

#[test]
fn a_qemu_machine_without_a_kernel_is_refused_with_the_fix() {
    let run = refused(r#"{ meta.name = "t"; machines.vm1 = { platform.type = "qemu"; }; }"#);
    says(&run, "machine vm1: option `boot.kernel` is not set, and a machine with `platform.type = \"qemu\"` boots its own kernel; set `boot.kernel = pkgs.linux;`");
}

#[test]
fn a_bad_accel_names_the_choices() {
    let run = refused(r#"{ pkgs, ... }: { meta.name = "t"; machines.vm1 = { boot.kernel = pkgs.busybox; platform = { type = "qemu"; accel = "hvf"; }; }; }"#);
    says(&run, "machine vm1: option `platform.accel` must be one of \"auto\", \"kvm\", \"tcg\", not a string (\"hvf\")");
}

#[test]
fn a_module_name_that_is_a_path_is_refused() {
    let run = refused(r#"{ meta.name = "t"; machines.box = { boot.kernelModules = [ "../../etc/shadow" ]; }; }"#);
    says(&run, "machine box: option `boot.kernelModules` names \"../../etc/shadow\", which is not a module name");
}

#[test]
fn a_kernel_parameter_with_a_newline_is_refused() {
    let run = refused(r#"{ meta.name = "t"; machines.box = { boot.kernelParams = [ "quiet\ninit=/bin/sh" ]; }; }"#);
    says(&run, "machine box: option `boot.kernelParams` has \"quiet\\ninit=/bin/sh\", which is empty or holds a control character");
}

#[test]
fn a_kernel_that_is_not_a_package_is_refused() {
    let run = refused(r#"{ meta.name = "t"; machines.box = { boot.kernel = "/boot/vmlinuz"; }; }"#);
    says(&run, "machine box: option `boot.kernel` must be a package");
}

#[test]
fn a_zero_image_size_and_a_tiny_vm_are_refused() {
    let run = refused(
        r#"{ pkgs, ... }: { meta.name = "t"; machines.vm1 = { boot.kernel = pkgs.busybox; image.size = 0; platform = { type = "qemu"; memory = 16; cpus = 0; }; }; }"#,
    );
    says(&run, "machine vm1: option `image.size` is 0 MiB");
    says(&run, "machine vm1: option `platform.memory` is 16 MiB, too little for the kernel to boot");
    says(&run, "machine vm1: option `platform.cpus` is 0");
}

#[test]
fn vm_options_evaluate_with_their_defaults() {
    let fl = Fl::new();
    let file = fl.file(
        "deployment.nix",
        r#"{ pkgs, ... }: { meta.name = "t"; machines.vm1 = { boot.kernel = pkgs.busybox; platform.type = "qemu"; }; machines.box = { }; }"#,
    );
    let ev = fl.run(&["eval", "-f", &file, "--json"]).ok().json();
    let vm = &ev["machines"]["vm1"];
    assert_eq!(vm["platform"]["memory"], 512);
    assert_eq!(vm["platform"]["cpus"], 1);
    assert_eq!(vm["platform"]["diskSize"], 2048);
    assert_eq!(vm["platform"]["accel"], "auto");
    assert_eq!(vm["platform"]["subnet"], "10.231.0.0/24");
    assert_eq!(vm["platform"]["forwardPorts"], serde_json::json!([]));
    assert!(vm["boot"]["kernel"].as_str().unwrap().ends_with("-busybox"), "{vm}");
    assert_eq!(vm["boot"]["kernelModules"], serde_json::json!([]));
    assert_eq!(vm["image"]["size"], serde_json::Value::Null);
    // A machine without boot options says nothing of them: its toplevel is what it was.
    assert!(ev["machines"]["box"].get("boot").is_none(), "{}", ev["machines"]["box"]);
}
