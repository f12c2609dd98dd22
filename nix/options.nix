# The machine options: the one definition of what a machine in a deployment may say.
#
# This file is data. eval.nix applies its defaults; flotilla checks every machine against it
# (unknown options, types, required values) before anything is built, and generates
# docs/options.md from it. An option is { _option = true; type; default; description; } where
# `default = null` means "unset", and `required = true` means the machine must set it.
let
  t = {
    str = { kind = "str"; };
    bool = { kind = "bool"; };
    int = { kind = "int"; };
    port = { kind = "port"; };
    mode = { kind = "mode"; };
    package = { kind = "package"; };
    absPath = { kind = "absPath"; };
    enum = values: { kind = "enum"; inherit values; };
    listOf = elem: { kind = "listOf"; inherit elem; };
    attrsOf = elem: { kind = "attrsOf"; inherit elem; };
    submodule = options: { kind = "submodule"; inherit options; };
    nullOr = elem: { kind = "nullOr"; inherit elem; };
    either = types: { kind = "either"; inherit types; };
    tagged = tag: defaultTag: variants: { kind = "tagged"; inherit tag defaultTag variants; };
  };

  opt = type: default: description: { _option = true; inherit type default description; };
  # An option whose values flotilla never prints, not even in an error about their type.
  secret = o: o // { secret = true; };
  req = type: description: { _option = true; inherit type description; default = null; required = true; };

  commandOrScript = {
    command = opt (t.nullOr (t.listOf t.str)) null
      "The program and its arguments, as a list; the first element is an absolute path (usually into a package, `\"\${pkgs.busybox}/bin/httpd\"`). Exactly one of `command` and `script` is set.";
    script = opt (t.nullOr t.str) null
      "A shell script, run with the package set's `runtimeShell`; flotilla writes it into the store with `writeShellScript`.";
  };

  healthCheck = t.submodule {
    http = opt (t.nullOr t.str) null
      "An `http://` URL that must answer with a 2xx status.";
    tcp = opt (t.nullOr t.port) null
      "A TCP port on the machine that must accept a connection.";
    command = opt (t.nullOr (t.listOf t.str)) null
      "A command run on the machine that must exit 0.";
    timeout = opt t.int 5 "Seconds one probe may take.";
    interval = opt t.int 2 "Seconds between probes.";
    retries = opt t.int 10 "Probes that may fail before the check counts as failed.";
  };

  # What machines on the deployment's bridge have, containers (`local`) and VMs (`qemu`) alike:
  # they share the bridge, its subnet and the port forwards.
  bridged = {
    address = opt (t.nullOr t.str) null
      "The machine's IPv4 address on the deployment's bridge; unset, flotilla allocates the lowest free one in `subnet` and keeps it.";
    subnet = opt t.str "10.231.0.0/24"
      "The deployment's bridge subnet, in CIDR form; every local and qemu machine of a deployment must name the same one.";
    forwardPorts = opt (t.listOf (t.submodule {
      host = req t.port "Port on the host's loopback.";
      guest = req t.port "Port on the machine.";
    })) [ ] "Ports forwarded from the host's 127.0.0.1 to the machine, so a browser can open a service.";
  };

  platforms = {
    local = {
      type = opt (t.enum [ "local" ]) "local" "The platform: `local` (namespace containers on this host, the default), `ssh` or `qemu`.";
    } // bridged;
    ssh = {
      type = opt (t.enum [ "ssh" ]) "ssh" "The platform type.";
      host = req t.str "Host name or address to ssh to (anything `ssh` accepts, including a Host alias from ~/.ssh/config).";
      port = opt (t.nullOr t.port) null "ssh port; unset, ssh's own configuration decides.";
      user = opt (t.nullOr t.str) null "Login user; a user other than root needs passwordless sudo.";
      identityFile = opt (t.nullOr t.str) null "Private key file (a string path on the deployer, never copied into the store).";
      sshOptions = opt (t.listOf t.str) [ ] "Extra arguments passed to ssh, e.g. [ \"-o\" \"ProxyJump=bastion\" ].";
    };
    qemu = {
      type = opt (t.enum [ "qemu" ]) "qemu" "The platform type: a local QEMU virtual machine on the deployment's bridge, booted with its toplevel's kernel and initramfs (so the machine must set `boot.kernel`).";
      memory = opt t.int 512 "Memory of the VM in MiB.";
      cpus = opt t.int 1 "Virtual CPUs.";
      diskSize = opt t.int 2048 "Disk size in MiB.";
      accel = opt (t.enum [ "auto" "kvm" "tcg" ]) "auto"
        "How QEMU runs the guest: `kvm` (hardware virtualisation), `tcg` (emulation, slower but works everywhere) or `auto` (KVM when it boots a guest on this host, else TCG).";
    } // bridged;
  };
in
{
  platform = opt (t.tagged "type" "local" platforms) { type = "local"; }
    "Where the machine runs. `type` picks the platform; the other options are that platform's own.";

  boot = opt (t.submodule {
    kernel = opt (t.nullOr t.package) null
      "The Linux kernel that boots the machine as a VM or from a disk image: a package with `bzImage` and `lib/modules/<version>/` (the layout of nixpkgs' `pkgs.linux`, e.g. `boot.kernel = pkgs.linux;`). Required with `platform.type = \"qemu\"` and for `flotilla image`; unset, the machine has no kernel of its own (containers and ssh hosts).";
    kernelModules = opt (t.listOf t.str) [ ]
      "Kernel modules added to the initramfs beside the ones flotilla always loads (virtio, iso9660, vfat), with their dependencies, loaded at boot before the root is mounted.";
    kernelParams = opt (t.listOf t.str) [ ]
      "Extra kernel command line parameters, appended after flotilla's own (`console=ttyS0 root=LABEL=flotilla-root` ...).";
  }) { } "How the machine boots when it is a VM or a disk image; ignored by containers and ssh hosts.";

  image = opt (t.submodule {
    size = opt (t.nullOr t.int) null
      "Size of the disk image's root filesystem in MiB; unset, the closure's size plus 30 % and 64 MiB. The qemu platform grows the filesystem to the VM's `diskSize` at boot.";
    maxLayers = opt t.int 100
      "Most layers of an OCI image (`flotilla image --format oci|docker-archive`), from 2 to 127 (registries refuse more): the store paths most referenced in the closure get a layer each, the rest share the last store layer, and one layer holds the machine itself (registry, generation, `/etc`).";
    entrypoint = opt (t.nullOr (t.listOf t.str)) null
      "The OCI image's entrypoint, a program and its arguments (`[ \"\${pkgs.busybox}/bin/httpd\" \"-f\" ]`); unset, the agent runs as the container's init (`flotilla-agent init --root /`): it starts the machine's services in `after` order, checks their health and stops them on SIGTERM, as on the machine.";
    labels = opt (t.attrsOf t.str) { }
      "Labels of the OCI image's config (`org.example.team = \"data\";`), beside `--label K=V` given to `flotilla image`.";
  }) { } "Images of the machine (`flotilla image`): disk images and OCI images.";

  deploy = opt (t.submodule {
    substituters = opt (t.listOf t.str) [ ]
      "Binary caches the machine fetches its closure from itself, before the deployer pushes the rest: plain `http://` URLs (e.g. a `flotilla cache serve` the machine reaches), tried in order. The host is an address or a name in the machine's own `/etc/hosts` (the agent does no DNS; a fresh container has its `/etc/hosts` only from its first activation on, so its first deploy is pushed). A path is taken only when its narinfo is signed by one of `trustedPublicKeys` and its NAR hash is the deployer's; anything a cache lacks, refuses or cannot serve is pushed by the deployer as usual. Used when `substituteOnDestination` is set or `flotilla deploy --substitute-on-destination` is given.";
    trustedPublicKeys = opt (t.listOf t.str) [ ]
      "The public keys (`name:base64`, as `nix-store --generate-binary-cache-key` and `flotilla cache keygen` write them) whose signatures the machine accepts on what `substituters` serve.";
    substituteOnDestination = opt t.bool false
      "Whether the machine fetches from `substituters` at every deploy (without `--substitute-on-destination`).";
    buildOnTarget = opt t.bool false
      "Whether the system is built on the machine's host, with that host's Nix, instead of on the deployer (`flotilla deploy --build-on target` does it for every selected machine): the derivations are copied there, realised there, and activated without the closure ever coming back to the deployer. For ssh machines whose host has Nix; `flotilla build` and `--goal build` still build on the deployer.";
  }) { } "How the deployer gets the closure onto the machine; not part of the system.";

  tags = opt (t.listOf t.str) [ ]
    "Free-form tags; `--on @tag` selects the machines that carry one.";

  checks = opt (t.attrsOf (t.submodule {
    http = req t.str "An `http://` URL, usually on the machine's address (`\"http://\${nodes.web1.ip}/\"`), that must answer with a 2xx status.";
    timeout = opt t.int 5 "Seconds one probe may take.";
    interval = opt t.int 2 "Seconds between probes.";
    retries = opt t.int 10 "Probes that may fail before the check counts as failed.";
  })) { } "Checks the deployer runs itself after activation, once the agent's health checks passed and before it confirms the new generation: what users outside the machine see. A failing check rolls the machine back.";

  packages = opt (t.listOf t.package) [ ]
    "Packages whose `bin/` entries are put on the machine's PATH (`/run/current-system/sw/bin`).";

  binsh = opt (t.nullOr t.absPath) null
    "A shell linked at `/bin/sh` on the machine, e.g. `\"\${pkgs.busybox}/bin/sh\"`; unset, `/bin/sh` is left alone.";

  files = opt (t.attrsOf (t.submodule {
    text = opt (t.nullOr t.str) null "The file's content. Exactly one of `text` and `source` is set.";
    source = opt (t.nullOr t.absPath) null "A file to use as the content: a Nix path literal (`./motd`, which Nix copies into the store) or a path into a package (`\"\${pkgs.hello}/share/motd\"`). A plain string naming a file outside the store (`\"/etc/shadow\"`) is refused.";
    mode = opt (t.nullOr t.mode) null
      "Octal permissions such as \"0640\"; unset, the entry is a symlink into the current system (read-only, follows generations). A setuid or setgid mode (\"4755\", \"2755\") is refused unless `allowSetuid` is set.";
    allowSetuid = opt t.bool false "Allows a `mode` with the setuid or setgid bit (\"4755\", \"2755\"): such a file runs with its owner's or group's rights whoever starts it, so it must be asked for explicitly.";
    user = opt t.str "root" "Owner of a copied file (with `mode` set).";
    group = opt t.str "root" "Group of a copied file (with `mode` set).";
  })) { }
    "Files under /etc, keyed by absolute path (`files.\"/etc/motd\".text = \"hi\";`). Entries flotilla placed and no longer declares are removed; others are never touched.";

  users = opt (t.attrsOf (t.submodule {
    uid = opt (t.nullOr t.int) null "Numeric user id; unset, the agent picks a free one from 1000 up and keeps it.";
    group = opt (t.nullOr t.str) null "Primary group; unset, a group of the user's own name (created if missing).";
    extraGroups = opt (t.listOf t.str) [ ] "Supplementary groups.";
    home = opt t.str "/var/empty" "Home directory.";
    shell = opt t.str "/bin/sh" "Login shell.";
    description = opt t.str "" "The GECOS field.";
  })) { } "Users the agent creates and keeps; `root` and `nobody` always exist.";

  groups = opt (t.attrsOf (t.submodule {
    gid = opt (t.nullOr t.int) null "Numeric group id; unset, the agent picks a free one.";
  })) { } "Groups the agent creates and keeps; `root`, `nogroup` and `nobody` always exist.";

  services = opt (t.attrsOf (t.submodule (commandOrScript // {
    environment = opt (t.attrsOf t.str) { } "Environment variables of the service.";
    user = opt t.str "root" "User the service runs as.";
    group = opt (t.nullOr t.str) null "Group the service runs as; unset, the user's primary group.";
    workingDirectory = opt (t.nullOr t.absPath) null "Working directory; unset, `/`.";
    restart = opt (t.enum [ "always" "on-failure" "never" ]) "on-failure"
      "When the supervisor restarts the service after it exits (with back-off).";
    after = opt (t.listOf t.str) [ ] "Services of this machine started before this one.";
    keys = opt (t.listOf t.str) [ ] "Keys the service needs: it starts once they are present and restarts when they change.";
    healthCheck = opt (t.nullOr healthCheck) null
      "How the agent tells that the service works after activation: one of `http`, `tcp`, `command`.";
  }))) { } "Long-running services supervised by the agent.";

  keys = secret (opt (t.attrsOf (t.submodule {
    text = opt (t.nullOr t.str) null "The secret itself. It is sent to the machine at deploy time and never enters any Nix store.";
    file = opt (t.nullOr t.str) null "A file on the deployer holding the secret (a string path; a Nix path literal is read the same way, never copied into the store).";
    command = opt (t.nullOr (t.listOf t.str)) null "A command run on the deployer whose standard output is the secret.";
    user = opt t.str "root" "Owner of the key file.";
    group = opt t.str "root" "Group of the key file.";
    mode = opt t.mode "0600" "Permissions of the key file.";
    destDir = opt t.absPath "/run/keys" "Directory the key is written to (`/run/keys` lives in memory). It must be private to root: a directory every user may write (`/tmp`, `/var/tmp`, `/dev/shm`, `/run/lock`) is refused at evaluation, and on the machine the agent refuses a directory on whose way there is a symbolic link, another user's directory or one its group or others may write.";
    uploadAt = opt (t.enum [ "pre-activation" "post-activation" ]) "pre-activation" "When the key is uploaded.";
  })) { } "Secrets placed on the machine at deploy time, never in the store: exactly one of `text`, `file`, `command`.");
}
