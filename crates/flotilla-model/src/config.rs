//! A machine's checked configuration as typed values, and the checks that need more than one
//! option at a time (references between services, users, keys; paths under /etc).
//!
//! The same types describe the system manifest that `flotilla-agent build-system` turns into
//! a toplevel, so the deployer and the agent cannot disagree on what a field means.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::schema::{did_you_mean, ConfigError, OptionPath};

/// Users that exist on every machine without being declared.
pub const BUILTIN_USERS: &[&str] = &["root", "nobody"];
/// Groups that exist on every machine without being declared.
pub const BUILTIN_GROUPS: &[&str] = &["root", "nogroup", "nobody"];

/// Where a machine runs; the tag is `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Platform {
    /// A namespace container on this host.
    Local(LocalPlatform),
    /// An existing host reached with OpenSSH.
    Ssh(SshPlatform),
    /// A local QEMU virtual machine.
    Qemu(QemuPlatform),
}

impl Platform {
    /// The platform's name as written in `platform.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Platform::Local(_) => "local",
            Platform::Ssh(_) => "ssh",
            Platform::Qemu(_) => "qemu",
        }
    }
}

/// Options of the `local` platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPlatform {
    /// Fixed IPv4 address, or `None` to allocate one.
    pub address: Option<String>,
    /// The deployment's bridge subnet (CIDR).
    pub subnet: String,
    /// Host loopback port → machine port forwards.
    pub forward_ports: Vec<PortForward>,
}

/// One forwarded port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Port on the host's loopback.
    pub host: u16,
    /// Port on the machine.
    pub guest: u16,
}

/// Options of the `ssh` platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SshPlatform {
    /// Host to connect to.
    pub host: String,
    /// Port, if not ssh's default.
    pub port: Option<u16>,
    /// Login user.
    pub user: Option<String>,
    /// Private key file on the deployer.
    pub identity_file: Option<String>,
    /// Extra ssh arguments.
    pub ssh_options: Vec<String>,
}

/// Options of the `qemu` platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QemuPlatform {
    /// Memory in MiB.
    pub memory: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Disk size in MiB.
    pub disk_size: u32,
    /// How QEMU runs the guest.
    pub accel: Accel,
    /// Fixed IPv4 address on the deployment's bridge, or `None` to allocate one.
    pub address: Option<String>,
    /// The deployment's bridge subnet (CIDR), shared with its local machines.
    pub subnet: String,
    /// Host loopback port → machine port forwards.
    pub forward_ports: Vec<PortForward>,
}

/// How QEMU runs a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it boots a guest on this host, else TCG.
    Auto,
    /// Hardware virtualisation only.
    Kvm,
    /// Emulation only.
    Tcg,
}

/// How a machine boots as a VM or from a disk image.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootOptions {
    /// The kernel package (`bzImage`, `lib/modules/<version>/`), if the machine has one.
    pub kernel: Option<String>,
    /// Extra modules for the initramfs.
    pub kernel_modules: Vec<String>,
    /// Extra kernel command line parameters.
    pub kernel_params: Vec<String>,
}

impl BootOptions {
    /// Whether every boot option has its default (the machine boots no kernel of its own).
    pub fn is_unset(&self) -> bool {
        *self == BootOptions::default()
    }
}

/// Options of the machine's disk images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageOptions {
    /// Root filesystem size in MiB; `None` computes it from the closure.
    pub size: Option<u32>,
    /// Most layers of an OCI image (2 to [`MAX_OCI_LAYERS`]).
    #[serde(default = "default_max_layers")]
    pub max_layers: i64,
    /// The OCI image's entrypoint; `None` runs the agent as init.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The OCI image config's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The most layers an OCI image may have: registries (the reference `distribution` server,
/// Docker Hub) and overlay filesystems refuse images of more, around 127.
pub const MAX_OCI_LAYERS: i64 = 127;

fn default_max_layers() -> i64 {
    100
}

impl Default for ImageOptions {
    fn default() -> ImageOptions {
        ImageOptions { size: None, max_layers: default_max_layers(), entrypoint: None, labels: BTreeMap::new() }
    }
}

/// A machine's whole checked config, as the deployer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineConfig {
    /// Where it runs.
    pub platform: Platform,
    /// Tags for `--on @tag`.
    pub tags: Vec<String>,
    /// Checks the deployer runs after activation, by name.
    #[serde(default)]
    pub checks: BTreeMap<String, DeployerCheck>,
    /// The system itself.
    #[serde(flatten)]
    pub system: SystemOptions,
    /// Secrets, with their material (never part of the toplevel).
    pub keys: BTreeMap<String, KeySpec>,
    /// Disk images of the machine (not part of the toplevel: an image's size does not
    /// change the system).
    #[serde(default)]
    pub image: ImageOptions,
    /// How the closure gets onto the machine (not part of the toplevel).
    #[serde(default)]
    pub deploy: DeploySettings,
}

/// How the deployer gets a machine's closure onto it: the binary caches the machine fetches
/// from itself, and the keys it trusts on what they serve.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploySettings {
    /// `http://` URLs of binary caches, in order.
    #[serde(default)]
    pub substituters: Vec<String>,
    /// `name:base64` ed25519 public keys.
    #[serde(default)]
    pub trusted_public_keys: Vec<String>,
    /// Fetch from the substituters at every deploy.
    #[serde(default)]
    pub substitute_on_destination: bool,
    /// Build the system on the machine's host, with its Nix (ssh machines), instead of here.
    #[serde(default)]
    pub build_on_target: bool,
}

impl DeploySettings {
    /// The checks of the `deploy` options, each error for the option it names.
    fn check(&self, err: &mut dyn FnMut(OptionPath, String)) {
        let at = OptionPath::root("deploy");
        for url in &self.substituters {
            if let Some(problem) = substituter_problem(url) {
                err(at.child("substituters"), problem);
            }
        }
        for key in &self.trusted_public_keys {
            if let Err(e) = flotilla_store::cache::PublicKey::parse(key) {
                err(at.child("trustedPublicKeys"), format!(
                    "has \"{key}\", which is not a public key ({e}); give the cache's public key as `name:base64`, the text of the `.public` file `flotilla cache keygen` (or `nix-store --generate-binary-cache-key`) wrote"
                ));
            }
        }
        if !self.substituters.is_empty() && self.trusted_public_keys.is_empty() {
            err(at.child("trustedPublicKeys"), "is empty, so the machine would refuse every path `deploy.substituters` serve; add the caches' public keys (`name:base64`)".into());
        }
        if self.substitute_on_destination && self.substituters.is_empty() {
            err(at.child("substituteOnDestination"), "is set, but `deploy.substituters` names no cache to fetch from; add one, e.g. [ \"http://10.231.0.1:5000\" ], or unset it".into());
        }
    }
}

/// Why the agent cannot fetch from `url`, if it cannot: it speaks plain `http://` only.
fn substituter_problem(url: &str) -> Option<String> {
    use flotilla_store::cache::{CacheUrl, UrlProblem};
    let shown = crate::escape_controls(url);
    match CacheUrl::parse(url).err()? {
        UrlProblem::Https => Some(format!(
            "has \"{shown}\", but the agent fetches plain http:// only (it carries no TLS, to stay small); a path is trusted for its signature by `deploy.trustedPublicKeys`, not for its transport: serve the cache over http:// on a network the machine reaches, e.g. \"http://{}\"",
            crate::escape_controls(url.trim_start_matches("https://"))
        )),
        UrlProblem::NotHttp => Some(format!("has \"{shown}\", which is not an http:// URL; write the cache's URL, e.g. \"http://10.231.0.1:5000\"")),
        why => Some(format!("has \"{shown}\", which is not a cache URL the agent can fetch ({why}): write http://HOST[:PORT][/PATH] with no user, fragment or space")),
    }
}

/// The options that make up the system (everything but platform, tags and key material).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemOptions {
    /// Store paths whose `bin/` goes on the PATH.
    pub packages: Vec<String>,
    /// The shell for `/bin/sh`.
    pub binsh: Option<String>,
    /// Files under /etc, by absolute path.
    pub files: BTreeMap<String, FileSpec>,
    /// Users to create.
    pub users: BTreeMap<String, UserSpec>,
    /// Groups to create.
    pub groups: BTreeMap<String, GroupSpec>,
    /// Supervised services.
    pub services: BTreeMap<String, ServiceSpec>,
    /// How it boots as a VM or image (absent in manifests older than the option, and left
    /// out while unset, as eval.nix leaves it out of the toplevel's manifest).
    #[serde(default, skip_serializing_if = "BootOptions::is_unset")]
    pub boot: BootOptions,
}

/// A file under /etc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSpec {
    /// Literal content.
    pub text: Option<String>,
    /// A store path to use as content.
    pub source: Option<String>,
    /// Octal mode; `None` links the entry into the current system instead of copying.
    pub mode: Option<String>,
    /// Owner of a copied file.
    pub user: String,
    /// Group of a copied file.
    pub group: String,
    /// Whether `mode` may carry the setuid or setgid bit.
    #[serde(default)]
    pub allow_setuid: bool,
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserSpec {
    /// Fixed uid, or `None` to allocate.
    pub uid: Option<u32>,
    /// Primary group; `None` means a group of the user's name.
    pub group: Option<String>,
    /// Supplementary groups.
    pub extra_groups: Vec<String>,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
    /// GECOS.
    pub description: String,
}

/// A group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Fixed gid, or `None` to allocate.
    pub gid: Option<u32>,
}

/// When a service is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// Only after a non-zero exit or a signal.
    OnFailure,
    /// Never.
    Never,
}

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Program and arguments. In a system manifest this is always set (scripts are resolved).
    pub command: Option<Vec<String>>,
    /// A shell script (only in the deployer's view; the manifest has `command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Environment variables.
    pub environment: BTreeMap<String, String>,
    /// User to run as.
    pub user: String,
    /// Group to run as; `None` is the user's primary group.
    pub group: Option<String>,
    /// Working directory.
    pub working_directory: Option<String>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Services started before this one.
    pub after: Vec<String>,
    /// Keys that must be present before it starts.
    pub keys: Vec<String>,
    /// How to tell it works.
    pub health_check: Option<HealthCheck>,
}

/// A service health check: exactly one of `http`, `tcp`, `command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// URL that must answer 2xx.
    pub http: Option<String>,
    /// Port that must accept.
    pub tcp: Option<u16>,
    /// Command that must exit 0.
    pub command: Option<Vec<String>>,
    /// Seconds per probe.
    pub timeout: u32,
    /// Seconds between probes.
    pub interval: u32,
    /// Failed probes allowed.
    pub retries: u32,
}

/// A check the deployer runs itself after activation: an HTTP URL that must answer 2xx.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployerCheck {
    /// URL that must answer 2xx.
    pub http: String,
    /// Seconds per probe.
    pub timeout: u32,
    /// Seconds between probes.
    pub interval: u32,
    /// Failed probes allowed.
    pub retries: u32,
}

/// When a key is uploaded relative to activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UploadAt {
    /// Before the new generation is activated.
    PreActivation,
    /// After it.
    PostActivation,
}

/// A secret: where it comes from on the deployer, and how it lands on the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    /// The secret itself (deployer side only).
    #[serde(default)]
    pub text: Option<String>,
    /// A file on the deployer holding it.
    #[serde(default)]
    pub file: Option<String>,
    /// A command on the deployer printing it.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Owner.
    pub user: String,
    /// Group.
    pub group: String,
    /// Octal mode.
    pub mode: String,
    /// Directory it is written to.
    pub dest_dir: String,
    /// When it is uploaded.
    pub upload_at: UploadAt,
}

impl KeySpec {
    /// The same key without its secret material, as it may appear in output and manifests.
    pub fn redacted(&self) -> KeySpec {
        KeySpec {
            text: self.text.as_ref().map(|_| "<redacted>".to_owned()),
            ..self.clone()
        }
    }
}

/// What the toplevel derivation is built from: a machine's system, keys without material,
/// scripts already written to the store. `flotilla-agent build-system` reads this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SystemConfig {
    /// The machine's name (its hostname).
    pub name: String,
    /// Everything else.
    #[serde(flatten)]
    pub system: SystemOptions,
    /// Key metadata (no material).
    pub keys: BTreeMap<String, KeySpec>,
}

fn valid_account_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn valid_unit_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(c))
}

impl MachineConfig {
    /// The checks between options. Call after the schema check passed.
    pub fn check(&self, machine: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut err = |option: OptionPath, problem: String| {
            errors.push(ConfigError { machine: machine.to_owned(), option, problem })
        };
        let sys = &self.system;

        let users: BTreeSet<&str> =
            sys.users.keys().map(String::as_str).chain(BUILTIN_USERS.iter().copied()).collect();
        let mut groups: BTreeSet<&str> =
            sys.groups.keys().map(String::as_str).chain(BUILTIN_GROUPS.iter().copied()).collect();
        // A user without a declared primary group gets a group of its own name.
        groups.extend(sys.users.iter().filter(|(_, u)| u.group.is_none()).map(|(n, _)| n.as_str()));

        let check_user = |err: &mut dyn FnMut(OptionPath, String), at: OptionPath, user: &str| {
            if !users.contains(user) {
                let hint = did_you_mean(user, users.iter().copied())
                    .map(|u| format!("did you mean \"{u}\", or "))
                    .unwrap_or_default();
                err(at, format!("names user \"{user}\", which this machine does not have; {hint}declare it in `users.{user}`"));
            }
        };
        let check_group = |err: &mut dyn FnMut(OptionPath, String), at: OptionPath, group: &str| {
            if !groups.contains(group) {
                err(at, format!("names group \"{group}\", which this machine does not have; declare it in `groups.{group}`"));
            }
        };

        for (name, u) in &sys.users {
            let at = OptionPath::root("users").child(name);
            if !valid_account_name(name) {
                err(at.clone(), "is not a valid user name: use lower-case letters, digits, `_` and `-`, starting with a letter or `_`, at most 32".into());
            }
            if let Some(g) = &u.group {
                check_group(&mut err, at.child("group"), g);
            }
            for g in &u.extra_groups {
                check_group(&mut err, at.child("extraGroups"), g);
            }
        }
        for name in sys.groups.keys() {
            if !valid_account_name(name) {
                err(OptionPath::root("groups").child(name), "is not a valid group name: use lower-case letters, digits, `_` and `-`, starting with a letter or `_`".into());
            }
        }

        if let Some(sh) = &sys.binsh {
            if flotilla_store::StorePath::parse_prefix(sh).is_err() {
                err(OptionPath::root("binsh"), format!("is \"{sh}\", which is not in the Nix store; use a package's shell, e.g. \"${{pkgs.busybox}}/bin/sh\""));
            }
        }

        for (path, f) in &sys.files {
            let at = OptionPath::root("files").child(path);
            if etc_relative(path).is_none() {
                err(at.clone(), etc_path_problem(path));
            }
            match (&f.text, &f.source) {
                (Some(_), Some(_)) => err(at.clone(), "sets both `text` and `source`; keep one".into()),
                (None, None) => err(at.clone(), "sets neither `text` nor `source`; give the file its content with one of them".into()),
                _ => {}
            }
            // A source is built into the system, so it must be in the store: a plain path
            // string would be read on the machine (or the builder), whatever file it names.
            if let Some(src) = &f.source {
                if flotilla_store::StorePath::parse_prefix(src).is_err() {
                    err(at.child("source"), format!(
                        "is \"{src}\", a path outside the Nix store, which would be read on the machine as it is; write a Nix path literal (`source = ./{name};`, which Nix copies into the store) or a path into a package (`\"${{pkgs.hello}}/share/...\"`), or use `text`",
                        name = src.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("file")
                    ));
                }
            }
            if let Some(mode) = &f.mode {
                let bits = u32::from_str_radix(mode, 8).unwrap_or(0);
                if bits & 0o6000 != 0 && !f.allow_setuid {
                    let what = if bits & 0o4000 != 0 { "setuid" } else { "setgid" };
                    err(at.child("mode"), format!(
                        "is \"{mode}\", which makes the file {what}; set `files.\"{path}\".allowSetuid = true;` if that is meant, or drop the leading digit (\"{:04o}\")",
                        bits & 0o777
                    ));
                }
            }
            if f.mode.is_some() {
                check_user(&mut err, at.child("user"), &f.user);
                check_group(&mut err, at.child("group"), &f.group);
            }
        }

        let mut lower: BTreeMap<String, &str> = BTreeMap::new();
        for (name, s) in &sys.services {
            let at = OptionPath::root("services").child(name);
            if !valid_unit_name(name) {
                err(at.clone(), "is not a valid service name: use letters, digits and `-_.@`, starting with a letter or digit".into());
            }
            if let Some(other) = lower.insert(name.to_lowercase(), name) {
                err(at.clone(), format!("and `services.{other}` are two services on one name (names are compared ignoring case); rename one"));
            }
            match (&s.command, &s.script) {
                (Some(_), Some(_)) => err(at.clone(), "sets both `command` and `script`; keep one".into()),
                (None, None) => err(at.clone(), "sets neither `command` nor `script`; say what to run".into()),
                (Some(cmd), None) if cmd.first().is_none_or(|p| !p.starts_with('/')) => {
                    err(at.child("command"), "must start with an absolute path to the program, e.g. [ \"${pkgs.busybox}/bin/httpd\" \"-f\" ]".into())
                }
                _ => {}
            }
            check_user(&mut err, at.child("user"), &s.user);
            if let Some(g) = &s.group {
                check_group(&mut err, at.child("group"), g);
            }
            for dep in &s.after {
                if dep == name {
                    err(at.child("after"), "names the service itself".into());
                } else if !sys.services.contains_key(dep) {
                    let hint = did_you_mean(dep, sys.services.keys().map(String::as_str))
                        .map(|d| format!("; did you mean \"{d}\"?"))
                        .unwrap_or_else(|| format!("; services of this machine: {}", sys.services.keys().cloned().collect::<Vec<_>>().join(", ")));
                    err(at.child("after"), format!("names service \"{dep}\", which this machine does not have{hint}"));
                }
            }
            for key in &s.keys {
                if !self.keys.contains_key(key) {
                    err(at.child("keys"), format!("names key \"{key}\", which this machine does not declare; add `keys.{key}`"));
                }
            }
            if let Some(hc) = &s.health_check {
                let n = [hc.http.is_some(), hc.tcp.is_some(), hc.command.is_some()].iter().filter(|b| **b).count();
                if n != 1 {
                    err(at.child("healthCheck"), "must set exactly one of `http`, `tcp`, `command`".into());
                }
                if let Some(url) = &hc.http {
                    if !url.starts_with("http://") {
                        err(at.child("healthCheck").child("http"), format!("is \"{url}\"; the agent probes plain http:// URLs"));
                    }
                }
            }
        }
        if let Some(cycle) = after_cycle(&sys.services) {
            err(OptionPath::root("services"), format!("have an `after` cycle: {}; break it", cycle.join(" → ")));
        }

        self.check_boot(&mut err);
        self.deploy.check(&mut err);
        if self.deploy.build_on_target && !matches!(self.platform, Platform::Ssh(_)) {
            err(OptionPath::root("deploy").child("buildOnTarget"), format!(
                "is set, but the machine's platform is `{}`: only an ssh machine's host can build with Nix of its own; unset it (the deployer builds the system)",
                self.platform.kind()
            ));
        }

        for (name, c) in &self.checks {
            if !c.http.starts_with("http://") {
                err(OptionPath::root("checks").child(name).child("http"), format!("is \"{}\"; the deployer probes plain http:// URLs", c.http));
            }
        }

        for (name, k) in &self.keys {
            let at = OptionPath::root("keys").child(name);
            if !valid_unit_name(name) {
                err(at.clone(), "is not a valid key name: it becomes a file name; use letters, digits and `-_.@`".into());
            }
            let n = [k.text.is_some(), k.file.is_some(), k.command.is_some()].iter().filter(|b| **b).count();
            if n != 1 {
                err(at.clone(), "must set exactly one of `text`, `file`, `command`".into());
            }
            check_user(&mut err, at.child("user"), &k.user);
            check_group(&mut err, at.child("group"), &k.group);
            if let Err(why) = check_key_dir(&k.dest_dir) {
                err(at.child("destDir"), why);
            }
        }
        errors
    }
}

impl MachineConfig {
    /// The boot, image and VM options: a qemu machine boots its own kernel, so it needs one;
    /// module names become file names in the initramfs builder; parameters are one line.
    fn check_boot(&self, err: &mut dyn FnMut(OptionPath, String)) {
        let boot = &self.system.boot;
        if let Platform::Qemu(q) = &self.platform {
            if boot.kernel.is_none() {
                err(OptionPath::root("boot").child("kernel"), "is not set, and a machine with `platform.type = \"qemu\"` boots its own kernel; set `boot.kernel = pkgs.linux;` (a package with `bzImage` and `lib/modules/<version>/`)".into());
            }
            let at = OptionPath::root("platform");
            if q.memory < 64 {
                err(at.child("memory"), format!("is {} MiB, too little for the kernel to boot; give the VM at least 64, e.g. `platform.memory = 512;`", q.memory));
            }
            if q.cpus == 0 {
                err(at.child("cpus"), "is 0; a VM needs at least one CPU: `platform.cpus = 1;`".into());
            }
            if q.disk_size < 256 {
                err(at.child("diskSize"), format!("is {} MiB, too small for the agent, a system and room to activate it; give it at least 256, e.g. `platform.diskSize = 2048;`", q.disk_size));
            }
        }
        for m in &boot.kernel_modules {
            let plain = !m.is_empty() && m.len() <= 64 && m.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
            if !plain {
                err(OptionPath::root("boot").child("kernelModules"), format!("names \"{}\", which is not a module name; write the module's name as `modinfo` shows it (letters, digits, `_`, `-`), e.g. \"virtio_rng\"", crate::escape_controls(m)));
            }
        }
        for p in &boot.kernel_params {
            if p.is_empty() || p.chars().any(char::is_control) {
                err(OptionPath::root("boot").child("kernelParams"), format!("has \"{}\", which is empty or holds a control character (a newline, a tab); give each parameter as one list element, e.g. [ \"quiet\" \"loglevel=4\" ]", crate::escape_controls(p)));
            }
        }
        if self.image.size == Some(0) {
            err(OptionPath::root("image").child("size"), "is 0 MiB; give the image's size in MiB, or leave it unset to compute it from the closure".into());
        }
        if !(2..=MAX_OCI_LAYERS).contains(&self.image.max_layers) {
            err(OptionPath::root("image").child("maxLayers"), format!(
                "is {}, and an OCI image needs at least 2 layers (the store, the machine) and registries refuse more than {MAX_OCI_LAYERS}; set it between 2 and {MAX_OCI_LAYERS} (default 100)",
                self.image.max_layers
            ));
        }
    }
}

/// Directories every user may write on a usual Linux machine (sticky, mode 1777).
const SHARED_DIRS: &[&str] = &["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"];

/// A key directory must be absolute, plain (no `.`/`..`), not `/`, and not where every user
/// may write: there another user could put a link where the key goes, and the agent (root)
/// would refuse the key at every deploy. The agent checks the machine's real directories
/// again before writing.
fn check_key_dir(dir: &str) -> Result<(), String> {
    let plain = dir.starts_with('/') && dir.len() > 1 && dir.trim_end_matches('/').split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..");
    if !plain {
        return Err(format!("is \"{dir}\"; it must be an absolute directory without `.` or `..`, and not /, e.g. \"/run/keys\""));
    }
    let dir = dir.trim_end_matches('/');
    if let Some(shared) = SHARED_DIRS.iter().find(|s| dir == **s || dir.starts_with(&format!("{s}/"))) {
        return Err(format!(
            "is \"{dir}\", under {shared}, where every user may write: another user could swap the key for a link to any file; use a directory only root can change, e.g. \"/run/keys\""
        ));
    }
    Ok(())
}

/// What is wrong with a `files` path that [`etc_relative`] refuses, and the fix.
fn etc_path_problem(path: &str) -> String {
    let odd: Vec<&str> = path.split('/').skip(1).filter(|c| c.is_empty() || *c == "." || *c == "..").collect();
    if !path.starts_with('/') || odd.is_empty() {
        return format!("is outside /etc: flotilla manages files under /etc only; write it as `files.\"/etc/{}\"`", path.trim_start_matches('/'));
    }
    // Resolve `.`, `..` and `//` by name, to say where the path points.
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            parts.pop();
        } else {
            parts.push(c);
        }
    }
    let resolved = format!("/{}", parts.join("/"));
    let what = if odd.contains(&"..") { "a `..` component" } else if odd.contains(&".") { "a `.` component" } else { "an empty component (`//`)" };
    let fix = match etc_relative(&resolved) {
        Some(_) => format!("write it as `files.\"{resolved}\"`"),
        None => format!("it points to {resolved}, outside /etc, and flotilla manages files under /etc only; name a file under /etc by its plain path, e.g. `files.\"/etc/{}\"`", parts.last().unwrap_or(&"motd")),
    };
    format!("has {what}; a file is named by its plain path, without `.`, `..` or `//`: {fix}")
}

/// The part of `path` below `/etc/`, if it names a file there (no `.`/`..` components).
pub fn etc_relative(path: &str) -> Option<&str> {
    let rel = path.strip_prefix("/etc/")?;
    let ok = !rel.is_empty() && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    ok.then_some(rel)
}

/// One cycle in the services' `after` graph, if there is one.
fn after_cycle(services: &BTreeMap<String, ServiceSpec>) -> Option<Vec<String>> {
    fn visit<'a>(
        n: &'a str,
        services: &'a BTreeMap<String, ServiceSpec>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n, 1);
        stack.push(n);
        for dep in services.get(n).map(|s| s.after.as_slice()).unwrap_or_default() {
            if dep != n && services.contains_key(dep.as_str()) {
                if let Some(c) = visit(dep, services, state, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in services.keys() {
        if let Some(c) = visit(n, services, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// Services in an order that honours `after` (dependencies first), ties by name.
pub fn start_order(services: &BTreeMap<String, ServiceSpec>) -> Vec<String> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < services.len() {
        let before = out.len();
        for (name, s) in services {
            if !done.contains(name.as_str())
                && s.after.iter().all(|d| done.contains(d.as_str()) || !services.contains_key(d))
            {
                done.insert(name);
                out.push(name.clone());
            }
        }
        if out.len() == before {
            // A cycle (refused at check time); append the rest rather than loop forever.
            out.extend(services.keys().filter(|n| !done.contains(n.as_str())).cloned());
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substituters_are_checked_by_the_agents_own_url_parser() {
        for ok in ["http://10.231.0.1:5000", "http://cache/x/", "http://[::1]:81/"] {
            assert_eq!(substituter_problem(ok), None, "{ok}");
        }
        // The agent refuses these when it fetches; the deployer refuses them first.
        for (bad, says) in [
            ("http://cache:0/", "port"),
            ("http://cache/a\u{1b}[2J", "control character"),
            ("http://ca\tche/", "control character"),
            ("http://u@cache/", "user information"),
            ("https://cache/", "no TLS"),
            ("cache:5000", "not an http:// URL"),
        ] {
            let problem = substituter_problem(bad).unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert!(problem.contains(says) && !problem.contains('\u{1b}'), "{bad:?}: {problem}");
        }
    }

    fn svc(after: &[&str]) -> ServiceSpec {
        ServiceSpec {
            command: Some(vec!["/nix/store/x/bin/a".into()]),
            script: None,
            environment: BTreeMap::new(),
            user: "root".into(),
            group: None,
            working_directory: None,
            restart: RestartPolicy::OnFailure,
            after: after.iter().map(|s| s.to_string()).collect(),
            keys: vec![],
            health_check: None,
        }
    }

    #[test]
    fn order_honours_after() {
        let mut s = BTreeMap::new();
        s.insert("web".to_string(), svc(&["db"]));
        s.insert("db".to_string(), svc(&[]));
        s.insert("api".to_string(), svc(&["web", "db"]));
        assert_eq!(start_order(&s), ["db", "web", "api"]);
        assert!(after_cycle(&s).is_none());
        s.insert("db".to_string(), svc(&["api"]));
        assert_eq!(after_cycle(&s).unwrap(), ["api", "web", "db", "api"]);
    }

    #[test]
    fn key_directories_are_plain_and_private() {
        for ok in ["/run/keys", "/run/keys/app", "/var/lib/app/", "/etc/ssl/private", "/tmpfiles"] {
            assert_eq!(check_key_dir(ok), Ok(()), "{ok}");
        }
        for bad in ["/", "run/keys", "/run/../etc", "/run/./keys", "/run//keys", ""] {
            assert!(check_key_dir(bad).unwrap_err().contains("absolute directory without"), "{bad}");
        }
        for shared in ["/tmp", "/tmp/app", "/var/tmp/x", "/dev/shm", "/run/lock/k"] {
            assert!(check_key_dir(shared).unwrap_err().contains("where every user may write"), "{shared}");
        }
    }

    #[test]
    fn etc_path_problems_say_what_is_wrong() {
        let p = etc_path_problem("/etc/../root/x");
        assert!(p.starts_with("has a `..` component"), "{p}");
        assert!(p.contains("points to /root/x, outside /etc"), "{p}");
        assert!(!p.contains("/etc/etc/"), "{p}");
        assert!(etc_path_problem("/etc/a/../b").ends_with("write it as `files.\"/etc/b\"`"));
        assert!(etc_path_problem("/etc//b").contains("an empty component"));
        assert!(etc_path_problem("/var/motd").contains("write it as `files.\"/etc/var/motd\"`"));
    }

    #[test]
    fn etc_paths() {
        assert_eq!(etc_relative("/etc/motd"), Some("motd"));
        assert_eq!(etc_relative("/etc/a/b"), Some("a/b"));
        for bad in ["/etc", "/etc/", "/var/x", "/etc/../x", "/etc/a//b", "etc/x"] {
            assert_eq!(etc_relative(bad), None, "{bad}");
        }
    }
}
