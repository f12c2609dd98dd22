#!/usr/bin/env bash
# Installs what flotilla and its tests need on Debian 12, as root: Nix (Debian's nix-bin, run
# as root, with the nixbld build users its own installer would create), a static busybox for the demo package set, iproute2 and util-linux's nsenter
# for the local platform, curl for the tests and the demo, OpenSSH and sudo for the ssh
# platform's test hosts.
# Rust comes from rustup and is assumed. Safe to run again: it installs only what is missing.
set -euo pipefail
# Debian puts mkfs.ext4, depmod and friends in /sbin and /usr/sbin, off a user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

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
# Machines as VMs (the qemu platform, `flotilla image`): QEMU, the ext4 and image tools the demo
# package set imports, and depmod for the demo kernel's module list.
command -v depmod >/dev/null 2>&1 || need+=(kmod)
command -v python3 >/dev/null 2>&1 || need+=(python3) # a test holds a port with it
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
# The agent's initramfs tests read its archive back with a real cpio; the VM boot tests make a
# NoCloud seed as a vfat disk labelled CIDATA and put its files on it without mounting it.
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v mkfs.vfat >/dev/null 2>&1 || need+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || need+=(mtools)
# OCI images: real clients check them. skopeo reads and copies layouts, umoci unpacks them,
# runc and rootful podman run them (tests/oci.rs and the demo; the tests give podman its own
# storage, config and events log under their tempdir); a real registry (the reference
# distribution server, started by tests/oci_push.rs on 127.0.0.1; installing it starts
# nothing) and htpasswd for its logins.
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
# PostgreSQL, for the state's second backend: the tests start a throwaway cluster of their own
# (initdb and pg_ctl under a temporary directory, a unix socket inside it, run as the package's
# `postgres` user) and remove it; installing starts no server (the policy-rc.d below).
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
# pip, for moto's S3 server (below).
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)

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

# QEMU's emulator must be the same release as the qemu-utils the host has: a machine image
# with qemu-utils from bookworm-backports cannot take bookworm's qemu-system-x86 beside it.
# The backports suite is added from the host's own Debian mirror, never a named one.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "install-deps: need root to install qemu-system-x86" >&2; exit 2; }
    export DEBIAN_FRONTEND=noninteractive
    release=()
    if dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null | grep -q '~bpo12'; then
        bash "$(dirname "$0")/apt-backports.sh"
        release=(-t bookworm-backports)
    fi
    apt-get update -q >/dev/null
    echo "install-deps: installing qemu-system-x86 ${release[*]}" >&2
    apt-get install -y -q --no-install-recommends "${release[@]}" qemu-system-x86 >/dev/null
fi

# `flotilla cache push s3://` is tested against moto's S3 server (a test double: no real
# S3-compatible server installs from the package registries here); boto3 comes with it and
# sets up the test's user and bucket. Debian's own Python takes it only outside its packages.
if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import boto3' 2>/dev/null; then
    echo "install-deps: installing moto[server] 5.2.1 (pip)" >&2
    # Pinned: the tests rely on its signature checking and its bucket listing.
    python3 -m pip install -q 'moto[server]==5.2.1' 2>/dev/null || python3 -m pip install -q --break-system-packages 'moto[server]==5.2.1'
fi

# The demo package set's kernel and image tools (nix/demo-pkgs.nix), staged once per version.
bash "$(dirname "$0")/demo-cache.sh"

# Nix as its own installer sets it up for a root-run Nix (`flotilla doctor` checks the result).
bash "$(dirname "$0")/setup-nix.sh"
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo not found; install Rust with rustup first" >&2; exit 2; }
