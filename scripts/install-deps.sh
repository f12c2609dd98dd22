#!/usr/bin/env bash
# Installs what flotilla and its tests need on Debian 12, as root: Nix (Debian's nix-bin,
# single-user), a static busybox for the demo package set, iproute2 and util-linux's nsenter
# for the local platform, curl for the tests and the demo.
# Rust comes from rustup and is assumed. Safe to run again: it installs only what is missing.
set -euo pipefail

need=()
command -v nix-instantiate >/dev/null 2>&1 || need+=(nix-bin)
[ -x /usr/bin/busybox ] || [ -x /bin/busybox ] || need+=(busybox-static)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
# The tests and the demo fetch pages from the machines the way a user would.
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v script >/dev/null 2>&1 || need+=(bsdutils) # a terminal for the `shell` test

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install: ${need[*]}" >&2
        exit 2
    fi
    echo "install-deps: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's nix-bin runs single-user as root; make sure its store and database exist.
if [ ! -d /nix/var/nix/db ]; then
    nix-store --init 2>/dev/null || true
fi
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo not found; install Rust with rustup first" >&2; exit 2; }
