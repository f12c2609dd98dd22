//! `flotilla image --format oci|docker-archive` (issue 16, review fixes): what goes into an
//! image from around it. The git annotations come only from a repository that tracks the
//! deployment file, name a commit only for a clean tree, and never carry the remote's token;
//! a setuid file of `files` keeps its mode in the image although Nix's sandbox refuses it;
//! `-o` never writes into a directory that is not a layout, and a docker archive's `-o`
//! directory gets the archive under its default name.

mod common;

use std::path::Path;
use std::process::Command;

use common::Fl;

const TOKEN: &str = "ghp_NotARealTokenButSecret42";

fn deployment() -> String {
    r##"{ meta.name = "ocitest"; machines.web = { pkgs, ... }: {
    packages = [ pkgs.busybox ];
    binsh = "${pkgs.busybox}/bin/sh";
    files."/etc/motd".text = "hi";
    files."/etc/su-helper" = { text = "#!/bin/sh\necho helper\n"; mode = "4755"; allowSetuid = true; };
    files."/etc/web.conf" = { text = "private"; mode = "2640"; group = "www"; allowSetuid = true; };
    groups.www = {};
    users.www = { group = "www"; };
  }; }
"##
    .to_owned()
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git").arg("-C").arg(dir).args(["-c", "user.name=t", "-c", "user.email=t@example.com"]).args(args).output().expect("git runs (apt-get install git)");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn git_out(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds `web` as an oci layout at `out`; the report and its raw JSON text.
fn image(fl: &Fl, file: &str, out: &Path) -> (serde_json::Value, String) {
    let r = fl.run(&["image", "-f", file, "web", "--format", "oci", "-o", &out.to_string_lossy(), "--tag", "v1", "--json"]).ok();
    (r.json(), r.stdout())
}

/// Every byte of every file under `dir`, for a search.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(all_bytes(&p));
        } else {
            v.extend(std::fs::read(&p).unwrap());
        }
    }
    v
}

#[test]
fn git_annotations_name_only_a_clean_tracked_commit_and_never_the_remotes_token() {
    let fl = Fl::new();
    let repo = fl.dir.path().join("fleet");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["remote", "add", "origin", &format!("https://alice:{TOKEN}@git.example.com/org/fleet.git?x={TOKEN}")]);
    std::fs::write(repo.join("README"), "fleet\n").unwrap();
    git(&repo, &["add", "README"]);
    git(&repo, &["commit", "-q", "-m", "readme"]);
    let file = repo.join("deployment.nix");
    std::fs::write(&file, deployment()).unwrap();
    let file = file.to_string_lossy().into_owned();

    // Untracked: the repository around it is not its repository.
    let (r, _) = image(&fl, &file, &fl.dir.path().join("a"));
    assert!(r["labels"].get("org.opencontainers.image.revision").is_none() && r["labels"].get("org.opencontainers.image.source").is_none(), "{r:#}");

    git(&repo, &["add", "deployment.nix"]);
    git(&repo, &["commit", "-q", "-m", "fleet"]);
    let head = git_out(&repo, &["rev-parse", "HEAD"]);
    let layout = fl.dir.path().join("b");
    let (r, text) = image(&fl, &file, &layout);
    assert_eq!(r["labels"]["org.opencontainers.image.revision"], head.as_str(), "{r:#}");
    assert_eq!(r["labels"]["org.opencontainers.image.source"], "https://git.example.com/org/fleet.git", "{r:#}");
    assert!(!text.contains(TOKEN) && !text.contains("alice"), "the token is in --json: {text}");
    let bytes = all_bytes(&layout);
    assert!(!bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()), "the token is in the layout");
    let raw: serde_json::Value = serde_json::from_str(&String::from_utf8(Command::new("skopeo").args(["inspect", "--raw", &format!("oci:{}:v1", layout.display())]).output().expect("skopeo runs").stdout).unwrap()).unwrap();
    assert_eq!(raw["annotations"]["org.opencontainers.image.source"], "https://git.example.com/org/fleet.git", "{raw:#}");

    // The setuid and setgid files keep their declared modes (Nix's sandbox refused them).
    let machine_layer = raw["layers"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let blob = layout.join("blobs/sha256").join(machine_layer);
    let out = Command::new("tar").args(["--numeric-owner", "-tvf"]).arg(&blob).output().expect("tar runs");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |name: &str| listing.lines().find(|l| l.ends_with(name)).unwrap_or_else(|| panic!("{name} not in the machine layer:\n{listing}")).to_owned();
    assert!(line(" etc/su-helper").starts_with("-rwsr-xr-x 0/0 "), "{}", line(" etc/su-helper"));
    let conf = line(" etc/web.conf");
    assert!(conf.starts_with("-rw-r-S--- 0/"), "{conf}");

    // A change not committed: no revision claims a commit that is not what was built.
    std::fs::write(repo.join("README"), "fleet, edited\n").unwrap();
    let (r, _) = image(&fl, &file, &fl.dir.path().join("c"));
    assert!(r["labels"].get("org.opencontainers.image.revision").is_none(), "a dirty tree got a revision: {r:#}");
    assert_eq!(r["labels"]["org.opencontainers.image.source"], "https://git.example.com/org/fleet.git");
}

#[test]
fn output_is_never_a_foreign_directory_and_an_archives_directory_gets_its_default_name() {
    let fl = Fl::new();
    let file = fl.file("deployment.nix", &deployment());
    let mine = fl.dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "mine").unwrap();
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &mine.to_string_lossy()]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("holds files and is no OCI image layout (it has no `oci-layout`)") && r.stderr().contains("give a new directory's path"), "{}", r.stderr());
    let names: Vec<_> = std::fs::read_dir(&mine).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["thesis.tex"], "nothing was written into the directory");
    let plain = fl.dir.path().join("plain");
    std::fs::write(&plain, "x").unwrap();
    let r = fl.run(&["image", "-f", &file, "web", "--format", "oci", "-o", &plain.to_string_lossy()]);
    assert!(r.code() != 0 && r.stderr().contains("is not a directory"), "{}", r.stderr());

    let r = fl.run(&["image", "-f", &file, "web", "--format", "docker-archive", "-o", &mine.to_string_lossy(), "--json"]).ok().json();
    let tag = r["tag"].as_str().unwrap();
    let archive = mine.join(format!("web-{tag}.tar"));
    assert_eq!(r["path"], archive.to_string_lossy().as_ref());
    assert!(archive.is_file() && std::fs::read_to_string(mine.join("thesis.tex")).unwrap() == "mine");
}
