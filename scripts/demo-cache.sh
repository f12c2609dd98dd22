#!/usr/bin/env bash
# Stages what the demo package set (nix/demo-pkgs.nix) imports from this host for machines
# that boot, into $FLOTILLA_DEMO_CACHE (default /var/cache/flotilla/demo):
#
#   linux/         Debian's cloud kernel in nixpkgs' `pkgs.linux` layout: bzImage, System.map,
#                  config, lib/modules/<version>/ with a modules.dep made by depmod. The
#                  package is fetched with `apt-get download` and unpacked with `dpkg-deb -x`:
#                  no kernel is installed on this host.
#   e2fsprogs/     mke2fs, and qemu-utils/: qemu-img, each as libexec/<tool> with the shared
#                  libraries it loads (lib/, the dynamic loader included), so that a Nix build
#                  in the sandbox can run it through that loader.
#
# Idempotent: each part is staged into a temporary directory and renamed into place, and kept
# while its version stamp matches the host's.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
cache=${FLOTILLA_DEMO_CACHE:-/var/cache/flotilla/demo}
say() { printf 'demo-cache: %s\n' "$*" >&2; }
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
    say "cannot write $cache (run this as root, or set FLOTILLA_DEMO_CACHE to a directory of yours); the demo set's kernel and image tools are not staged"
    exit 2
fi
chmod 755 "$cache"

# --- the kernel ---------------------------------------------------------------------------
# (awk reads all its input: an early exit would end apt-cache with SIGPIPE, which pipefail sees.)
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !found { print $2; found = 1 }' || true; }
kernel_pkg=$(kernel_pkg)
if [ -z "$kernel_pkg" ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -q >/dev/null
    kernel_pkg=$(kernel_pkg)
fi
if [ -z "$kernel_pkg" ]; then
    say "no linux-image-cloud-amd64 in apt's lists; run apt-get update, then this again"
    exit 2
fi
# A security update keeps the package's name and changes its version: both are the stamp.
kernel_stamp="$kernel_pkg $(apt-cache show --no-all-versions "$kernel_pkg" 2>/dev/null | awk '/^Version:/ && !found { print $2; found = 1 }' || true)"
if [ "$(cat "$cache/linux/package" 2>/dev/null)" != "$kernel_stamp" ]; then
    say "staging $kernel_pkg"
    work=$(mktemp -d "$cache/.linux.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -q "$kernel_pkg" 2>/dev/null >/dev/null) || {
        chmod 777 "$work"   # apt's sandbox user fetches into the directory
        (cd "$work" && apt-get download -q "$kernel_pkg" >/dev/null)
    }
    dpkg-deb -x "$work"/"$kernel_pkg"_*.deb "$work/deb"
    version=${kernel_pkg#linux-image-}
    out="$work/linux"
    mkdir -p "$out/lib/modules"
    cp "$work/deb/boot/vmlinuz-$version" "$out/bzImage"
    cp "$work/deb/boot/System.map-$version" "$out/System.map"
    cp "$work/deb/boot/config-$version" "$out/config"
    mv "$work/deb/lib/modules/$version" "$out/lib/modules/$version"
    depmod -b "$out" "$version"
    echo "$kernel_stamp" >"$out/package"
    chmod -R u+rwX,go+rX,go-w "$out"
    rm -rf "$cache/linux.old"
    [ ! -e "$cache/linux" ] || mv "$cache/linux" "$cache/linux.old"
    mv "$out" "$cache/linux"
    rm -rf "$cache/linux.old" "$work"
    trap - EXIT
fi

# --- host tools ---------------------------------------------------------------------------
# stage NAME PACKAGE BINARY...: BINARY's files and their libraries under $cache/NAME.
stage() {
    local name=$1 package=$2
    shift 2
    local stamp
    stamp="$package $(dpkg-query -W -f '${Version}' "$package")"
    [ "$(cat "$cache/$name/package" 2>/dev/null)" != "$stamp" ] || return 0
    say "staging $name from $stamp"
    local out
    out=$(mktemp -d "$cache/.$name.XXXXXX")
    mkdir -p "$out/libexec" "$out/lib"
    local bin lib
    for bin in "$@"; do
        cp -L "$bin" "$out/libexec/$(basename "$bin")"
        for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
            cp -Ln "$lib" "$out/lib/$(basename "$lib")"
        done
    done
    echo "$stamp" >"$out/package"
    chmod -R u+rwX,go+rX,go-w "$out"
    rm -rf "${cache:?}/$name"
    mv "$out" "$cache/$name"
}
stage e2fsprogs e2fsprogs "$(command -v mke2fs)"
stage qemu-utils qemu-utils "$(command -v qemu-img)"
