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
in
{
  inherit busybox runtimeShell runCommand writeTextFile writeText writeTextDir writeScript
    writeShellScript writeShellScriptBin symlinkJoin;
}
