#!/usr/bin/env bash
# Sets Nix up on this host the way Nix's own installer does for a Nix run as root, which
# Debian's nix-bin leaves undone: the build users group and its build users, the store and
# its database, and /etc/nix/nix.conf. Nix run as root builds as one of the build users of
# `build-users-group` (default `nixbld`) and refuses to build at all while that group is
# missing or has no members.
#
# Idempotent and conservative: it creates only what is missing, and changes nothing that is
# already set up or that the host configured on purpose (a nix.conf of its own, an empty
# `build-users-group` to build as root, a build users group that already has members).
# Run as root; `flotilla doctor` checks the result.
set -euo pipefail

say() { printf 'setup-nix: %s\n' "$*" >&2; }

# What Nix's multi-user installer uses; ids already taken are left to the system to choose.
group_id=30000
first_uid=30001
user_count=32

if [ "$(id -u)" -ne 0 ]; then
    say "not root: leaving Nix's set-up alone (run this as root to create the build users)"
    exit 0
fi
for tool in nix nix-store; do
    command -v "$tool" >/dev/null || { say "$tool not found; install Nix first (Debian: apt-get install nix-bin)"; exit 2; }
done

# The configuration file, only where the host has none: the build users group stated
# explicitly, as Nix's installer writes it.
if [ ! -e /etc/nix/nix.conf ] && [ ! -L /etc/nix/nix.conf ]; then
    mkdir -p /etc/nix
    tmp=$(mktemp /etc/nix/.nix.conf.XXXXXX)
    cat >"$tmp" <<'CONF'
# Written by flotilla's scripts/setup-nix.sh, as Nix's installer writes it for a Nix run as
# root: builds run as the members of this group, never as root.
build-users-group = nixbld
CONF
    chmod 644 "$tmp"
    mv -f "$tmp" /etc/nix/nix.conf
    say "wrote /etc/nix/nix.conf (build-users-group = nixbld)"
fi

# The group Nix will build as, as Nix itself reads its configuration (nix.conf, NIX_CONFIG).
if ! config=$(nix --extra-experimental-features nix-command show-config); then
    say "cannot read Nix's configuration (Nix said why above); fix /etc/nix/nix.conf or NIX_CONFIG and run this again"
    exit 2
fi
group=$(sed -n 's/^build-users-group = //p' <<<"$config")
if [ -z "$group" ]; then
    say "build-users-group is empty: Nix builds as root here, as configured; no build users needed"
elif [ "$group" != nixbld ]; then
    # A name of the host's choosing: its accounts are the host's business, not ours.
    getent group "$group" >/dev/null ||
        say "warning: build-users-group is '$group', which does not exist; create it with build users, or set it to nixbld and run this again"
else
    if ! getent group nixbld >/dev/null; then
        if getent group "$group_id" >/dev/null; then
            groupadd --system nixbld
        else
            groupadd --system --gid "$group_id" nixbld
        fi
        say "created group nixbld"
    fi
    gid=$(getent group nixbld | cut -d: -f3)
    members=$(getent group nixbld | cut -d: -f4)
    # Build users are made when the group has none, or only some of the installer's own
    # (a run that was interrupted); a group with members of the host's choosing is left alone.
    if [ -z "$members" ] || ! grep -Evq '^nixbld[0-9]+$' < <(tr , '\n' <<<"$members"); then
        nologin=/usr/sbin/nologin
        [ -x "$nologin" ] || nologin=/sbin/nologin
        made=0
        for i in $(seq 1 "$user_count"); do
            user=nixbld$i
            getent passwd "$user" >/dev/null && continue # the host's own account of that name
            uid=$((first_uid + i - 1))
            # The installer's uid where it is free (no --system then: useradd would only warn
            # that it is above the system range), else one the system picks.
            uid_args=(--uid "$uid")
            getent passwd "$uid" >/dev/null && uid_args=(--system)
            useradd --no-create-home --home-dir /var/empty --shell "$nologin" \
                --comment "Nix build user $i" --gid "$gid" --groups nixbld --no-user-group \
                --password '!' "${uid_args[@]}" "$user"
            made=$((made + 1))
        done
        [ "$made" -eq 0 ] || say "created $made build users in group nixbld"
        [ -n "$(getent group nixbld | cut -d: -f4)" ] ||
            say "warning: group nixbld has no members and every nixbld1..$user_count name is taken; add build users to it"
    fi
fi

# The store and its database (Nix takes the store's ownership and mode from the group itself).
if [ ! -e /nix/var/nix/db/db.sqlite ]; then
    nix-store --init
    say "initialised the Nix store database"
fi
