# A tiny package set with nixpkgs' names, built from the host's static busybox (Debian's
# busybox-static), so examples and tests run where there is no nixpkgs and no network.
# Use it as nixpkgs: `flotilla build -I nixpkgs=nix/demo-pkgs.nix -f ...`; deployments written
# against it work unchanged against real nixpkgs.
{ busyboxBinary ? null, ... }:
let
  system = builtins.currentSystem;

  # The host's busybox, imported as a directory holding only `busybox`: busybox picks its
  # applet from argv[0], and Nix runs a builder as the base name of its store path, so the
  # binary must keep the name `busybox` inside its store path.
  hostBusyboxDir =
    if busyboxBinary != null then dirOf busyboxBinary
    else if builtins.pathExists /usr/bin/busybox then /usr/bin
    else if builtins.pathExists /bin/busybox then /bin
    else throw "demo-pkgs.nix: no static busybox at /usr/bin/busybox or /bin/busybox; install Debian's busybox-static";

  bootstrap = builtins.path {
    name = "busybox-static-bootstrap";
    path = hostBusyboxDir;
    filter = path: type: baseNameOf path == "busybox";
  };

  busybox = derivation {
    name = "busybox";
    inherit system;
    builder = "${bootstrap}/busybox";
    args = [ "sh" "-e" "-c" ''
      bb=${bootstrap}/busybox
      $bb mkdir -p $out/bin
      $bb cp $bb $out/bin/busybox
      for applet in $($bb --list); do
        [ "$applet" = busybox ] || $bb ln -s busybox "$out/bin/$applet"
      done
    '' ];
  };

  runtimeShell = "${busybox}/bin/sh";

  runCommand = name: env: buildCommand: derivation ({
    inherit name system;
    builder = runtimeShell;
    args = [ "-e" "-c" buildCommand ];
    PATH = "${busybox}/bin";
  } // env);

  writeTextFile = { name, text, executable ? false, destination ? "" }:
    runCommand name { inherit text; passAsFile = [ "text" ]; } ''
      target="$out${destination}"
      mkdir -p "$(dirname "$target")"
      cp "$textPath" "$target"
      ${if executable then ''chmod +x "$target"'' else ""}
    '';

  writeText = name: text: writeTextFile { inherit name text; };
  writeTextDir = path: text: writeTextFile { name = baseNameOf path; inherit text; destination = "/${path}"; };
  writeScript = name: text: writeTextFile { inherit name text; executable = true; };
  writeShellScript = name: text: writeScript name "#!${runtimeShell}\n${text}";
  writeShellScriptBin = name: text:
    writeTextFile { inherit name; text = "#!${runtimeShell}\n${text}"; executable = true; destination = "/bin/${name}"; };

  symlinkJoin = { name, paths, ... }:
    runCommand name { } ''
      mkdir -p $out
      for p in ${toString paths}; do
        (cd "$p" && find . ! -type d) | while read -r f; do
          f="''${f#./}"
          mkdir -p "$out/$(dirname "$f")"
          ln -sf "$p/$f" "$out/$f"
        done
      done
    '';

  # What scripts/install-deps.sh (scripts/demo-cache.sh) staged from Debian's packages: the
  # cloud kernel in nixpkgs' `linux` layout, mke2fs and qemu-img with every library they load.
  # Read only when a deployment uses them, so others evaluate without the cache.
  demoCache =
    let env = builtins.getEnv "FLOTILLA_DEMO_CACHE";
    in if env != "" then env else "/var/cache/flotilla/demo";

  staged = what: name:
    let dir = "${demoCache}/${what}"; in
    if builtins.pathExists "${dir}/package" then builtins.path { path = /. + dir; inherit name; }
    else throw "demo-pkgs.nix: ${dir} holds no staged ${what} (its `package` file is missing); run scripts/install-deps.sh (it stages the demo cache with scripts/demo-cache.sh), or point FLOTILLA_DEMO_CACHE at a staged cache";

  # A program of a staged tool, run through the staged dynamic loader with the staged
  # libraries, so it runs inside a sandboxed build where the host's /lib is absent.
  # `argv0` is the name the program sees (mke2fs behaves as mkfs.ext4 by it).
  stagedWrapper = pname: dir: programs: runCommand pname { } (''
    mkdir -p $out/bin
  '' + builtins.concatStringsSep "" (map
    (p: ''
      cat > $out/bin/${p.name} <<'EOF'
      #!${runtimeShell}
      exec ${dir}/lib/ld-linux-x86-64.so.2 --library-path ${dir}/lib --argv0 ${p.name} ${dir}/libexec/${p.program} "$@"
      EOF
      chmod +x $out/bin/${p.name}
    '')
    programs));

  # Debian's cloud kernel (`bzImage`, `lib/modules/<version>/` with modules.dep): a stand-in
  # for nixpkgs' `linux` (the store path itself, as that is a package with that layout).
  linux = staged "linux" "linux";

  # A test stand-in for a kernel upgrade: `linux` under another store path, its bzImage
  # followed by a marker (a bzImage's loader ignores bytes past its payload, as it does a
  # signature appended there), so a test can tell by the bytes which kernel QEMU was given.
  # Same layout: `bzImage`, `lib/modules/<version>/` (the modules are `linux`'s).
  linux_alt = runCommand "linux-alt" { } ''
    mkdir -p $out
    cat ${linux}/bzImage > $out/bzImage
    echo flotilla-test-linux-alt >> $out/bzImage
    ln -s ${linux}/lib ${linux}/System.map ${linux}/config $out/
  '';

  e2fsprogs = stagedWrapper "e2fsprogs" (staged "e2fsprogs" "e2fsprogs-staged") [
    { name = "mkfs.ext4"; program = "mke2fs"; }
    { name = "mke2fs"; program = "mke2fs"; }
  ];

  # busybox's gzip, for tools that want nixpkgs' `gzip` (`bin/gzip`).
  gzip = runCommand "gzip" { } ''
    mkdir -p $out/bin
    ln -s ${busybox}/bin/busybox $out/bin/gzip
  '';

  # A package at two versions, so a plan can show an upgrade (`hello 1.0 -> 2.0`):
  # `bin/hello` prints its version; `hello serve` then sleeps, a service that stays up.
  mkHello = version: runCommand "hello-${version}" { } ''
    mkdir -p $out/bin
    cat > $out/bin/hello <<EOF
    #!${runtimeShell}
    echo "hello ${version}"
    [ "\$1" = serve ] && exec ${busybox}/bin/sleep 2147483647
    exit 0
    EOF
    chmod +x $out/bin/hello
  '';
  hello = mkHello "1.0";
  hello_2 = mkHello "2.0";

  qemu-utils = stagedWrapper "qemu-utils" (staged "qemu-utils" "qemu-utils-staged") [
    { name = "qemu-img"; program = "qemu-img"; }
  ];
in
{
  inherit busybox runtimeShell runCommand writeTextFile writeText writeTextDir writeScript
    writeShellScript writeShellScriptBin symlinkJoin linux linux_alt e2fsprogs qemu-utils gzip
    hello hello_2;
}
