# flotilla's entry point into Nix: evaluates a deployment file into machine configs and
# toplevel derivations. flotilla calls it with nix-instantiate; nothing else should.
#
#   deployment  absolute path of the user's deployment file
#   factsJson   JSON { <machine> = { ip = ...; ... }; } of deploy-time facts (may be "{}")
#   agent       absolute path of the static flotilla-agent binary (only for `toplevels`)
#   only        comma-separated machine names whose toplevels are wanted ("" = all)
#
# Checking happens in flotilla (Rust) against `options`, between evaluating `configs` and
# instantiating `toplevels`; this file only applies defaults, resolves what only Nix can
# resolve, and refuses the few mistakes only Nix can see (a secret with store context).
{ deployment
, factsJson ? "{}"
, agent ? null
, only ? ""
}:
let
  inherit (builtins)
    attrNames concatStringsSep filter hasContext isAttrs isFunction isList isPath
    listToAttrs mapAttrs removeAttrs split typeOf;

  options = import ./options.nix;
  facts = builtins.fromJSON factsJson;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # Later definitions win; attribute sets merge recursively; lists concatenate.
  merge = a: b:
    if isAttrs a && isAttrs b && !(isDerivation a) && !(isDerivation b) then
      a // mapAttrs (n: v: if a ? ${n} then merge a.${n} v else v) b
    else if isList a && isList b then a ++ b
    else b;

  call = m: args: if isFunction m then m args else m;

  # The deployment file: an attribute set, or a function of { pkgs, ... } returning one.
  file = import (/. + deployment);
  raw = call file { inherit pkgs; lib = flotillaLib; };
  meta = raw.meta or { };
  defaults = raw.defaults or { };
  machineDefs = raw.machines or { };

  pkgs =
    let src = meta.nixpkgs or <nixpkgs>;
    in if isAttrs src then src else call (import src) { };

  # Small helpers machine configs may use, so examples need no nixpkgs lib.
  flotillaLib = { inherit merge; };

  nodeFacts = name: (facts.${name} or { }) // { inherit name; };
  nodes = mapAttrs (name: _: nodeFacts name) machineDefs;

  # Applies option defaults along the schema, keeping anything unknown for the checker.
  withDefaults = type: v:
    if type.kind == "submodule" && isAttrs v && !(isDerivation v) then
      v // mapAttrs (n: o: withDefaults o.type (v.${n} or o.default))
        (removeAttrs type.options (filter (n: (type.options.${n}.required or false) && !(v ? ${n}))
          (attrNames type.options)))
    else if type.kind == "tagged" && isAttrs v then
      let tag = v.${type.tag} or type.defaultTag; in
      if type.variants ? ${tag} then withDefaults { kind = "submodule"; options = type.variants.${tag}; } v else v
    else if type.kind == "attrsOf" && isAttrs v && !(isDerivation v) then mapAttrs (_: withDefaults type.elem) v
    else if type.kind == "listOf" && isList v then map (withDefaults type.elem) v
    else if type.kind == "nullOr" && v != null then withDefaults type.elem v
    else v;

  machineOptions = { kind = "submodule"; inherit options; };

  # A key's secret must never reach the store: a path literal is read as a plain path string,
  # and text carrying store context (it interpolated a path or package) is refused.
  sanitiseKey = machine: keyName: key:
    if !(isAttrs key) then key
    else if key ? text && builtins.isString key.text && hasContext key.text then
      throw "machine ${machine}: keys.${keyName}.text refers to the Nix store (it interpolates a path or package), so the secret would be copied into the store; read it at deploy time instead with keys.${keyName}.file = \"/path/on/deployer\" or keys.${keyName}.command"
    else if key ? file && isPath key.file then key // { file = toString key.file; }
    else key;

  # Machines on the deployment's bridge (local containers and qemu VMs) resolve each other by
  # name: every one gets an /etc/hosts naming all of them, unless its config sets /etc/hosts
  # itself.
  onBridge = type: type == "local" || type == "qemu";
  isLocal = cfg: onBridge ((cfg.platform or { }).type or "local");
  localNodes = filter (n: onBridge (facts.${n}.platform or null) && facts.${n} ? ip) (attrNames machineDefs);
  hostsText = concatStringsSep "" ([ "127.0.0.1 localhost\n" "::1 localhost\n" ]
    ++ map (n: "${facts.${n}.ip} ${n}\n") localNodes);
  withHosts = merged:
    if isAttrs merged && isLocal merged && !((merged.files or { }) ? "/etc/hosts")
    then merged // { files = (merged.files or { }) // { "/etc/hosts".text = hostsText; }; }
    else merged;

  configOf = name:
    let
      args = { inherit name nodes pkgs; lib = flotillaLib; };
      merged = withHosts (merge (call defaults args) (call machineDefs.${name} args));
      cfg = withDefaults machineOptions merged;
    in
    if isAttrs merged && isAttrs (merged.keys or null)
    then cfg // { keys = mapAttrs (sanitiseKey name) cfg.keys; }
    else cfg;

  configs = mapAttrs (name: _: configOf name) machineDefs;

  # What the toplevel is built from: no platform, tags, checks, deploy or image options (the deployer's concern, they
  # must not change the system), no secret material, services' scripts written to the store.
  # `boot` is left out while it is all defaults, so a machine that sets no boot option keeps
  # the toplevel it had before the option existed.
  # A kernel is booted from the initramfs derivation's copy of its `bzImage` (the derivation
  # holds the modules the machine loads), so the system's closure leaves out the kernel
  # package and its hundred MiB of modules.
  systemConfig = name: cfg:
    removeAttrs cfg ([ "platform" "tags" "checks" "deploy" "image" ] ++ (if hasBoot cfg then [ ] else [ "boot" ])) // {
      inherit name;
    } // (if hasKernel cfg then { boot = cfg.boot // { kernel = "${initrd name}"; }; } else { }) // {
      keys = mapAttrs (_: k: removeAttrs k [ "text" "file" "command" ]) cfg.keys;
      services = mapAttrs
        (svc: s:
          if s.script != null
          then removeAttrs s [ "script" ] // { command = [ "${pkgs.writeShellScript "${name}-${svc}" s.script}" ]; }
          else removeAttrs s [ "script" ])
        cfg.services;
    };

  agentPath =
    if agent == null then throw "flotilla: internal error: the agent binary was not passed to eval.nix"
    else builtins.path { path = /. + agent; name = "flotilla-agent"; };

  hasBoot = cfg: isAttrs (cfg.boot or null)
    && (cfg.boot.kernel != null || cfg.boot.kernelModules != [ ] || cfg.boot.kernelParams != [ ]);
  hasKernel = cfg: isAttrs (cfg.boot or null) && cfg.boot.kernel != null;

  # The initramfs of a machine with a kernel: the agent as /init and the kernel's modules it
  # needs (`flotilla-agent build-initrd`), and a copy of the kernel's `bzImage`.
  initrd = name: let cfg = configs.${name}; in derivation {
    name = "flotilla-initrd-${name}";
    system = builtins.currentSystem;
    builder = agentPath;
    args = [ "build-initrd" ];
    kernel = cfg.boot.kernel;
    kernelModules = concatStringsSep " " cfg.boot.kernelModules;
  };

  # A toplevel of a machine with a kernel links `kernel`, `initrd` and writes `kernel-params`
  # (build-system reads the kernel and its parameters from the manifest, the initrd from here).
  toplevel = name: let cfg = configs.${name}; in derivation ({
    name = "flotilla-system-${name}";
    system = builtins.currentSystem;
    builder = agentPath;
    args = [ "build-system" ];
    agent = agentPath;
    manifest = builtins.toJSON (systemConfig name cfg);
    passAsFile = [ "manifest" ];
  } // (if hasKernel cfg then { initrd = "${initrd name}"; } else { }));

  # Disk images: `images.<machine>.<format>`. The builder (`flotilla-agent build-image`)
  # stages the toplevel's closure (listed by exportReferencesGraph) with the agent's registry
  # and generation 1, makes an ext4 filesystem of it with the package set's e2fsprogs, and
  # converts it with its qemu-utils.
  imageFormats = [ "raw" "qcow2" "vdi" "vmdk" "gce" ];
  image = name: format: let cfg = configs.${name}; top = toplevel name; in
    if !(hasKernel cfg) then
      throw "machine ${name}: option `boot.kernel` is not set, and a disk image boots the machine's own kernel; set `boot.kernel = pkgs.linux;`"
    else derivation ({
      name = "flotilla-image-${name}-${format}";
      system = builtins.currentSystem;
      builder = agentPath;
      args = [ "build-image" ];
      inherit format;
      toplevel = top;
      e2fsprogs = pkgs.e2fsprogs;
      qemuUtils = pkgs.qemu-utils;
      size = if cfg.image.size == null then "" else toString cfg.image.size;
      kernelParams = concatStringsSep " " cfg.boot.kernelParams;
      exportReferencesGraph = [ "closure" top ];
    } // (if format == "gce" then { gzip = pkgs.gzip; } else { }));

  # The machine layer of an OCI image: `ociRoots.<machine>` (builder `flotilla-agent
  # build-oci-root`) stages the agent's registry of the closure, generation 1 and /etc as
  # activation places it, and lists the closure with its references for the deployer, which
  # streams the store paths into the image's other layers itself.
  ociRoot = name: let top = toplevel name; in derivation {
    name = "flotilla-oci-root-${name}";
    system = builtins.currentSystem;
    builder = agentPath;
    args = [ "build-oci-root" ];
    toplevel = top;
    agent = agentPath;
    exportReferencesGraph = [ "closure" top "agentClosure" agentPath ];
  };

  selected =
    if only == "" then attrNames machineDefs
    else filter (s: builtins.isString s && s != "") (split "," only);

  # Phase 1: what provisioning needs; it must not depend on facts.
  phase1 = {
    name = meta.name or null;
    description = meta.description or "";
    builders = meta.builders or null;
    buildLocally = meta.buildLocally or true;
    machines = mapAttrs
      (_: cfg: if isAttrs cfg then { platform = cfg.platform or { }; tags = cfg.tags or [ ]; } else { })
      configs;
    inherit options;
  };

  # Phase 3: the selected machines' toplevel derivations.
  toplevels = listToAttrs (map
    (name: { inherit name; value = let d = toplevel name; in { drv = d.drvPath; out = d.outPath; }; })
    selected);
in
{
  inherit phase1;

  # Phase 2: every machine's config with defaults, evaluated with facts.
  inherit configs;

  inherit toplevels;

  # The selected machines' disk image derivations, by format: { drv, out } as toplevels.
  images = listToAttrs (map
    (name: {
      inherit name;
      value = listToAttrs (map
        (format: { name = format; value = let d = image name format; in { drv = d.drvPath; out = d.outPath; }; })
        imageFormats);
    })
    selected);

  # The selected machines' OCI machine layers: { drv, out } as toplevels.
  ociRoots = listToAttrs (map
    (name: { inherit name; value = let d = ociRoot name; in { drv = d.drvPath; out = d.outPath; }; })
    selected);

  # All three at once, for a redeploy whose facts are known: one evaluation instead of three.
  everything = { inherit phase1 configs toplevels; };
}
