#!/usr/bin/env bash
# Installs what flotilla and its tests need on Debian 12, as root: Nix (Debian's nix-bin, run
# as root, with the nixbld build users its own installer would create), a static busybox for the demo package set, iproute2 and util-linux's nsenter
# for the local platform, curl for the tests and the demo, OpenSSH and sudo for the ssh
# platform's test hosts.
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
# The ssh platform's tests start their own sshd hosts in namespaces (tests/common/sshhost.rs).
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v sudo >/dev/null 2>&1 || need+=(sudo)
# The systemd unit of ssh hosts is checked with systemd-analyze (tests/systemd_unit.rs);
# installing the package starts nothing where PID 1 is not systemd.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install: ${need[*]}" >&2
        exit 2
    fi
    echo "install-deps: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd, openssh-server's postinst would start an sshd on this machine: a
    # policy-rc.d that exits 101 forbids starting services. Only ours is removed afterwards.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        trap 'rm -f "$policy"' EXIT
        printf '#!/bin/sh\n# install-deps.sh: no services started while installing\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# Nix as its own installer sets it up for a root-run Nix (`flotilla doctor` checks the result).
bash "$(dirname "$0")/setup-nix.sh"
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo not found; install Rust with rustup first" >&2; exit 2; }
