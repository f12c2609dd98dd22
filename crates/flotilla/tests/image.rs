//! `flotilla image` (issue 15): a machine's disk image in every format, each checked by a real
//! tool (`qemu-img info`/`check`, `e2fsck`, `debugfs`, `tar`); two builds are the same bytes;
//! the file name carries the toplevel's hash. The demo package set's kernel (the staged
//! Debian cloud kernel) is the machine's `boot.kernel`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Fl;

/// Fails loudly when a tool the checks use is missing.
fn require_tools() {
    for (tool, arg) in [("qemu-img", "--version"), ("e2fsck", "-V"), ("debugfs", "-V"), ("tar", "--version")] {
        let ok = Command::new(tool).arg(arg).output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "prerequisite missing: {tool}; run scripts/install-deps.sh (qemu-utils, e2fsprogs)");
    }
    let cache = std::env::var("FLOTILLA_DEMO_CACHE").unwrap_or_else(|_| "/var/cache/flotilla/demo".into());
    assert!(Path::new(&cache).join("linux/package").exists(), "prerequisite missing: the demo kernel in {cache}/linux; run scripts/install-deps.sh");
}

fn deployment(page: &str) -> String {
    format!(
        r#"{{ pkgs, ... }}: {{
  meta.name = "imgs";
  machines.vm1 = {{ pkgs, ... }}: {{
    boot.kernel = pkgs.linux;
    boot.kernelParams = [ "quiet" ];
    packages = [ pkgs.busybox ];
    services.web.command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{pkgs.writeTextDir "index.html" "{page}"}}" ];
  }};
}}"#
    )
}

fn tool(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", argv[0]));
    assert!(out.status.success(), "`{}` failed:\n{}{}", argv.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `flotilla image` and returns its JSON report.
fn image(fl: &Fl, file: &str, format: &str, out: &Path) -> serde_json::Value {
    let out = out.to_string_lossy();
    fl.run(&["image", "-f", file, "vm1", "--format", format, "-o", &out, "--json"]).ok().json()
}

fn qemu_info(path: &str) -> serde_json::Value {
    serde_json::from_str(&tool(&["qemu-img", "info", "--output=json", path])).unwrap()
}

#[test]
fn every_format_checks_with_real_tools_and_two_builds_are_byte_identical() {
    require_tools();
    let fl = Fl::new();
    let file = fl.file("deployment.nix", &deployment(&format!("formats {}", common::random_hex(4))));
    let dir: PathBuf = fl.dir.path().join("images");
    std::fs::create_dir(&dir).unwrap();

    let raw = image(&fl, &file, "raw", &dir);
    let raw_path = raw["path"].as_str().unwrap().to_owned();
    let toplevel = raw["toplevel"].as_str().unwrap().to_owned();
    let hash = &toplevel["/nix/store/".len().."/nix/store/".len() + 32];
    assert_eq!(Path::new(&raw_path), dir.join(format!("vm1-{hash}.img")), "the file name carries the toplevel's hash");
    let size = std::fs::metadata(&raw_path).unwrap().len();
    let info = qemu_info(&raw_path);
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], size);
    assert!(raw["qemuCommand"].as_str().unwrap().contains(&format!("-drive file={raw_path},format=raw")), "{raw}");
    assert!(raw["qemuCommand"].as_str().unwrap().contains("-append 'console=ttyS0 root=LABEL=flotilla-root quiet'"), "{raw}");
    assert!(Path::new(raw["kernel"].as_str().unwrap()).exists() && Path::new(raw["initrd"].as_str().unwrap()).exists(), "{raw}");

    // The filesystem is clean and holds the agent's registry and generation 1.
    tool(&["e2fsck", "-fn", &raw_path]);
    let db = tool(&["debugfs", "-R", "ls -l /nix/var/flotilla/db", &raw_path]);
    let base = &toplevel["/nix/store/".len()..];
    assert!(db.contains(base), "the registry lacks the toplevel:\n{db}");
    assert!(db.lines().filter(|l| l.contains("-busybox")).count() == 1, "the registry lacks busybox:\n{db}");
    let reg = tool(&["debugfs", "-R", &format!("cat /nix/var/flotilla/db/{base}"), &raw_path]);
    let reg: serde_json::Value = serde_json::from_str(&reg).unwrap_or_else(|e| panic!("{e}: {reg}"));
    let nix_hash = tool(&["nix-store", "--query", "--hash", &toplevel]);
    let nix_hash = flotilla_store::NarHash::parse(nix_hash.trim()).unwrap();
    assert_eq!(reg["narHash"], serde_json::to_value(nix_hash).unwrap(), "the registry's NAR hash is Nix's");
    // A link this long lives in a block, which `cat` prints; a short one in the inode.
    let generation = tool(&["debugfs", "-R", "cat /nix/var/flotilla/profiles/system-1-link", &raw_path]);
    assert_eq!(generation, toplevel, "generation 1 is the toplevel");
    let system = tool(&["debugfs", "-R", "stat /nix/var/flotilla/profiles/system", &raw_path]);
    assert!(system.contains("Fast link dest: \"system-1-link\""), "{system}");
    let root = tool(&["debugfs", "-R", "ls /", &raw_path]);
    for d in ["nix", "dev", "proc", "sys", "run", "tmp", "etc", "var", "root"] {
        assert!(root.split_whitespace().any(|w| w == d), "no /{d} in the image:\n{root}");
    }
    let label = tool(&["debugfs", "-R", "stats", &raw_path]);
    assert!(label.contains("Filesystem volume name:   flotilla-root"), "{label}");

    // Every other format, checked by qemu-img; the same virtual size.
    let mut built = vec![("raw".to_owned(), raw_path.clone(), raw["storePath"].as_str().unwrap().to_owned())];
    for format in ["qcow2", "vdi", "vmdk"] {
        let r = image(&fl, &file, format, &dir);
        let path = r["path"].as_str().unwrap().to_owned();
        assert_eq!(Path::new(&path), dir.join(format!("vm1-{hash}.{format}")));
        let info = qemu_info(&path);
        assert_eq!(info["format"], format, "{info}");
        assert_eq!(info["virtual-size"], size, "{format}: {info}");
        tool(&["qemu-img", "check", "-f", format, &path]);
        built.push((format.to_owned(), path, r["storePath"].as_str().unwrap().to_owned()));
    }
    let gce = image(&fl, &file, "gce", &dir);
    let gce_path = gce["path"].as_str().unwrap();
    assert_eq!(Path::new(gce_path), dir.join(format!("vm1-{hash}.tar.gz")));
    assert_eq!(tool(&["tar", "-tzf", gce_path]), "disk.raw\n", "the gce tar holds exactly disk.raw");
    let verbose = tool(&["tar", "-tvzf", gce_path]);
    assert!(verbose.contains("0/0") && verbose.contains("1970-01-01"), "{verbose}");
    built.push(("gce".to_owned(), gce_path.to_owned(), gce["storePath"].as_str().unwrap().to_owned()));

    // Built again from nothing (the first build deleted from the store): the same bytes.
    for (format, first, store) in &built {
        let kept = format!("{first}.first");
        std::fs::rename(first, &kept).unwrap();
        tool(&["nix-store", "--delete", store]);
        assert!(!Path::new(store).exists());
        let again = image(&fl, &file, if format == "raw" { "raw" } else { format }, &dir);
        assert_eq!(again["path"].as_str().unwrap(), first);
        let (a, b) = (std::fs::read(&kept).unwrap(), std::fs::read(first).unwrap());
        assert!(a == b, "{format}: two builds differ ({} and {} bytes)", a.len(), b.len());
    }
}

#[test]
fn a_changed_configuration_gets_a_new_file_name() {
    require_tools();
    let fl = Fl::new();
    let dir = fl.dir.path().join("images");
    std::fs::create_dir(&dir).unwrap();
    let first = image(&fl, &fl.file("a.nix", &deployment("one")), "raw", &dir);
    let second = image(&fl, &fl.file("b.nix", &deployment("two")), "raw", &dir);
    assert_ne!(first["toplevel"], second["toplevel"]);
    assert_ne!(first["path"], second["path"]);
    assert!(Path::new(first["path"].as_str().unwrap()).exists() && Path::new(second["path"].as_str().unwrap()).exists());
}

#[test]
fn a_machine_without_a_kernel_gets_no_image() {
    let fl = Fl::new();
    let file = fl.file("d.nix", r#"{ meta.name = "nokernel"; machines.box = { }; }"#);
    let run = fl.run(&["image", "-f", &file, "box", "--format", "qcow2", "-o", &fl.dir.path().to_string_lossy()]);
    assert_eq!(run.code(), 2, "{}\n{}", run.stdout(), run.stderr());
    assert!(
        run.stderr().contains("machine box: option `boot.kernel` is not set, and a disk image boots the machine's own kernel; set `boot.kernel = pkgs.linux;`"),
        "{}",
        run.stderr()
    );
    assert!(std::fs::read_dir(fl.dir.path()).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".qcow2")));
}

#[test]
fn an_image_size_smaller_than_the_closure_fails_with_the_builders_reason() {
    require_tools();
    let fl = Fl::new();
    let file = fl.file(
        "small.nix",
        &deployment(&format!("small {}", common::random_hex(4))).replace("boot.kernelParams = [ \"quiet\" ];", "image.size = 8;"),
    );
    let run = fl.run(&["image", "-f", &file, "vm1", "--format", "vmdk", "-o", &fl.dir.path().to_string_lossy()]);
    assert_eq!(run.code(), 2, "{}\n{}", run.stdout(), run.stderr());
    let err = run.stderr();
    assert!(err.contains("machine vm1: the vmdk image did not build"), "{err}");
    assert!(err.contains("`image.size` is 8 MiB, less than the") && err.contains("unset it to have it computed"), "the builder's reason is in the error:\n{err}");
    assert!(std::fs::read_dir(fl.dir.path()).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".vmdk")));
}
