#!/usr/bin/env bash
# Benchmark (not a test): copying closures over ssh, flotilla beside what its peers use.
#
# colmena, deploy-rs, morph and NixOps copy with `nix copy --to ssh://` or `nix-copy-closure`.
# This puts flotilla beside them, on copy.sh's closures (about 1 GiB of /usr/lib as one store
# path, and 2,001 small paths), each reached through a machine's toplevel, to one sshd host
# with Nix, in one run:
#   flotilla          `flotilla deploy --goal copy` of an ssh machine whose closure holds the
#                     path (toplevel built beforehand, not timed): probe, agent bootstrap, the
#                     copy itself, registration with the host's Nix; its report's copy seconds
#                     are shown too
#   nix copy          `nix copy --to ssh://root@HOST` of the same toplevel's closure
#   nix-copy-closure  `nix-copy-closure --to root@HOST` of the same
#   tar | ssh | tar   the closure's directories, `tar -c | ssh HOST tar -x`: the floor (no
#                     hashing, no registration, one stream)
# Every run starts from a fresh host (an empty /nix with `nix-store --init`) and a fresh
# deployer state. Figures are the best of $RUNS runs, after a `sync`.
#
# The host is made as tests/common/sshhost.rs makes its hosts "with Nix": a network namespace
# on a bridge inside the benchmark's own namespace, its own root (the machine's /usr through a
# read-only overlay, a private /etc, /nix, /run, ...), a PID namespace whose PID 1 keeps sshd
# running. Nothing touches the machine's own network namespace, /etc or sshd.
#
#   bash bench/ssh-copy.sh                 # BIG_MB=1024 SMALL_PATHS=2000 RUNS=2
#   BIG_MB=200 RUNS=1 bash bench/ssh-copy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIG_MB=${BIG_MB:-1024}
SMALL_PATHS=${SMALL_PATHS:-2000}
RUNS=${RUNS:-2}
SUBNET=10.251.0
ADDR=$SUBNET.2

. bench/lib.sh
hns="" hparent="" hpid=""
cleanup() {
    host_stop
    bench_cleanup
}
trap cleanup EXIT
bench_setup sshcopy
for tool in /usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen /usr/bin/nix-copy-closure /usr/sbin/chroot; do
    [ -x "$tool" ] || { echo "ssh-copy.sh: $tool is missing; run scripts/install-deps.sh" >&2; exit 2; }
done

in_ns() { nsenter --net="/run/netns/$ns" -- "$@"; }

# The lab: a client key, a host key every fresh host reuses, a known_hosts naming it.
ssh-keygen -q -t ed25519 -N "" -C flotilla-bench-client -f "$work/id_ed25519"
ssh-keygen -q -t ed25519 -N "" -C "" -f "$work/host_key"
echo "$ADDR $(cut -d' ' -f1-2 "$work/host_key.pub")" >"$work/known_hosts"
sshopts="-F /dev/null -i $work/id_ed25519 -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile=$work/known_hosts -o StrictHostKeyChecking=yes -o GlobalKnownHostsFile=/dev/null"
in_ns ip link add flbr0 type bridge
in_ns ip addr add "$SUBNET.1/24" dev flbr0
in_ns ip link set flbr0 up

# host_start → a fresh host with Nix at $ADDR: $hpid is its PID 1, $hroot its /.
host_start() {
    local hdir=$work/host
    hroot=$hdir/root
    mkdir -p "$hdir/usr-hidden"
    for d in usr etc/ssh var/log var/lib var/tmp home run/sshd nix dev proc root/.ssh tmp; do mkdir -p "$hroot/$d"; done
    chmod 1777 "$hroot/tmp" "$hroot/var/tmp"
    chmod 700 "$hroot/root"
    for f in var/log/lastlog var/log/wtmp var/log/btmp run/utmp; do : >"$hroot/$f"; done
    ln -s usr/bin "$hroot/bin"; ln -s usr/sbin "$hroot/sbin"; ln -s usr/lib "$hroot/lib"; ln -s usr/lib64 "$hroot/lib64"
    for what in passwd group shadow gshadow nsswitch.conf pam.d security login.defs ld.so.cache ld.so.conf ld.so.conf.d environment default ssh/moduli nix; do
        [ ! -e "/etc/$what" ] || cp -a "/etc/$what" "$hroot/etc/$what"
    done
    echo target >"$hroot/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 target\n' >"$hroot/etc/hosts"
    cp "$work/host_key" "$hroot/etc/ssh/ssh_host_ed25519_key"
    cp "$work/host_key.pub" "$hroot/etc/ssh/ssh_host_ed25519_key.pub"
    cp "$work/id_ed25519.pub" "$hroot/root/.ssh/authorized_keys"
    cat >"$hroot/etc/ssh/sshd_config" <<EOF
# Written by bench/ssh-copy.sh, as tests/common/sshhost.rs writes its hosts'.
ListenAddress $ADDR
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AuthorizedKeysFile .ssh/authorized_keys
PidFile /run/sshd.pid
PrintMotd no
PrintLastLog no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    hns=$ns-host
    ip netns add "$hns"
    in_ns ip link add flbv0 type veth peer name eth0 netns "$hns"
    in_ns ip link set flbv0 master flbr0 up
    ip -n "$hns" link set lo up
    ip -n "$hns" addr add "$ADDR/24" dev eth0
    ip -n "$hns" link set eth0 up
    ip -n "$hns" route add default via "$SUBNET.1"
    nsenter --net="/run/netns/$hns" -- unshare --mount --pid --uts --ipc --fork --propagation private -- sh -c "
        set -e
        mount -t overlay overlay -o lowerdir=$hdir/usr-hidden:/usr $hroot/usr
        mount --rbind /dev $hroot/dev
        mount -t proc proc $hroot/proc
        hostname target
        exec chroot $hroot /bin/sh -c 'while :; do /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config; sleep 0.2; done'" \
        </dev/null >"$hdir/sshd.log" 2>&1 &
    hparent=$!
    hpid=""
    for _ in $(seq 500); do
        hpid=$(cut -d' ' -f1 "/proc/$hparent/task/$hparent/children" 2>/dev/null || true)
        [ -z "$hpid" ] || break
        sleep 0.01
    done
    [ -n "$hpid" ] || { echo "the host's PID 1 did not start:" >&2; cat "$hdir/sshd.log" >&2; exit 1; }
    for _ in $(seq 300); do
        # shellcheck disable=SC2086
        if in_ns ssh $sshopts -o ConnectTimeout=2 "root@$ADDR" true </dev/null 2>/dev/null; then break; fi
        sleep 0.05
    done
    # shellcheck disable=SC2086
    in_ns ssh $sshopts "root@$ADDR" true </dev/null || { echo "the host's sshd does not accept the bench's key:" >&2; cat "$hdir/sshd.log" >&2; exit 1; }
    # Only once sshd answers: before, PID 1 may not have chrooted yet.
    nsenter --target "$hpid" --mount --uts --ipc --net --pid --root --wd -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin nix-store --init
    [ -d "$hroot/nix/var/nix/db" ] || { echo "nix-store --init made no database in the host" >&2; exit 1; }
}

# host_stop → the host and everything in it gone (PID 1 killed: its namespace with it).
host_stop() {
    [ -n "$hparent" ] || return 0
    [ -z "$hpid" ] || kill -KILL "$hpid" 2>/dev/null || true
    wait "$hparent" 2>/dev/null || true
    in_ns ip link del flbv0 2>/dev/null || true
    ip netns del "$hns" 2>/dev/null || true
    chmod -R u+w "$work/host" 2>/dev/null || true
    rm -rf "$work/host"
    hparent="" hpid=""
}

# Checks the host has the whole closure of $1, valid in its own Nix database.
host_has() {
    local missing
    missing=$(nix-store -qR "$1" | while read -r p; do [ -e "$hroot$p" ] || echo "$p"; done | head -3)
    [ -z "$missing" ] || { echo "after $2 the host lacks: $missing" >&2; exit 1; }
}
host_registered() {
    nsenter --target "$hpid" --mount --uts --ipc --net --pid --root --wd -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        nix-store --check-validity $(nix-store -qR "$1") || { echo "after $2 the host's Nix does not know the closure" >&2; exit 1; }
}

# The machine whose closure holds PATH; its platform the host, strictly checked.
machine_file() {
    local name=$1 path=$2 file=$work/$1.nix
    cat >"$file" <<EOF
{ meta.name = "sshcopy-$name";
  machines.target = { pkgs, ... }: {
    platform = { type = "ssh"; host = "$ADDR"; user = "root"; identityFile = "$work/id_ed25519";
      sshOptions = [ "-o" "UserKnownHostsFile=$work/known_hosts" "-o" "StrictHostKeyChecking=yes" "-o" "GlobalKnownHostsFile=/dev/null" ]; };
    # A package is a directory (build-system looks into its bin/): the path is linked inside one.
    packages = [ (pkgs.runCommand "payload-$name" { } "mkdir \$out; ln -s \${builtins.storePath "$path"} \$out/payload") ];
  };
}
EOF
    echo "$file"
}

run_flotilla() { # file state → wall seconds, and $work/fl.json the report
    FLOTILLA_STATE=$2 fl deploy -f "$1" --goal copy --json >"$work/fl.events" 2>"$work/fl.log" || { cat "$work/fl.log" >&2; tail -3 "$work/fl.events" >&2; exit 1; }
}
run_nix_copy() {
    in_ns env NIX_SSHOPTS="$sshopts" nix --extra-experimental-features nix-command copy --no-check-sigs --option substituters '' --to "ssh://root@$ADDR" "$1"
}
run_nix_copy_closure() {
    in_ns env NIX_SSHOPTS="$sshopts" nix-copy-closure --to "root@$ADDR" "$1"
}
run_tar() {
    # shellcheck disable=SC2086
    nix-store -qR "$1" | sed 's|^/||' | tar -C / -cf - -T - | in_ns ssh $sshopts "root@$ADDR" 'tar -C / -xf -'
}

echo "== preparing closures" >&2
big=$(big_path "$BIG_MB" "$work/stage")
many=$(small_paths "$SMALL_PATHS")

best() { sort -g | head -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
size_of() { nix-store -qR "$1" | xargs nix-store -q --size | awk '{ s += $1 } END { printf "%.1f MiB", s / 1048576 }'; }

declare -A results
for name in big many; do
    file=$(machine_file "$name" "${!name}")
    FLOTILLA_STATE=$work/build.db fl build -f "$file" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
    top=$(FLOTILLA_STATE=$work/build.db fl build -f "$file" --json | jq -r '.. | .toplevel? // empty' | head -1)
    case $top in /*) ;; ?*) top=/nix/store/$top ;; esac
    [ -e "$top" ] || { echo "no toplevel for $name in flotilla build --json" >&2; exit 1; }
    for tool in flotilla nix_copy nix_copy_closure tar; do
        times=()
        for i in $(seq "$RUNS"); do
            host_start
            sync
            t0=$(now)
            case $tool in
                flotilla) run_flotilla "$file" "$work/state-$name-$i.db" ;;
                *) "run_$tool" "$top" >/dev/null 2>"$work/$tool.log" || { cat "$work/$tool.log" >&2; exit 1; } ;;
            esac
            t1=$(now)
            times+=("$(secs "$t0" "$t1")")
            host_has "$top" "$tool"
            case $tool in
                flotilla)
                    host_registered "$top" "$tool"
                    jq -r 'select(.deployment) | .machines[0].copy.seconds' "$work/fl.events" >>"$work/fl-copy-$name" ;;
                nix_copy | nix_copy_closure) host_registered "$top" "$tool" ;;
            esac
            host_stop
        done
        results[$name.$tool]=$(printf '%s\n' "${times[@]}" | best)
    done
    results[$name.flcopy]=$(best <"$work/fl-copy-$name")
    results[$name.label]="$name ($(nix-store -qR "$top" | wc -l) paths, $(size_of "$top"))"
done

echo
printf '%-28s %10s %10s %10s %10s | %9s %9s %9s\n' closure flotilla "nix copy" "n-c-c" "tar|ssh" "nix/fl" "ncc/fl" "fl/tar"
goals=()
for name in big many; do
    f=${results[$name.flotilla]} x=${results[$name.nix_copy]} c=${results[$name.nix_copy_closure]} t=${results[$name.tar]}
    printf '%-28s %9.2fs %9.2fs %9.2fs %9.2fs | %9s %9s %9s\n' "${results[$name.label]}" "$f" "$x" "$c" "$t" \
        "$(ratio "$x" "$f")" "$(ratio "$c" "$f")" "$(ratio "$f" "$t")"
    printf '  (flotilla: of which %.2fs in its copy step, the rest eval, probe and agent bootstrap)\n' "${results[$name.flcopy]}"
    want=$([ "$name" = many ] && echo 2 || echo 1.2)
    if awk -v x="$x" -v f="$f" -v w="$want" 'BEGIN { exit !(x / f >= w) }'; then m=met; else m="NOT met"; fi
    goals+=("$m: $name: at least ${want}x faster than nix copy ($(ratio "$x" "$f"))")
    if awk -v t="$t" -v f="$f" 'BEGIN { exit !(f / t <= 1.3) }'; then m=met; else m="NOT met"; fi
    goals+=("$m: $name: within 1.3x of tar | ssh | tar ($(ratio "$f" "$t"))")
done
echo
echo "nix/fl and ncc/fl above 1 mean flotilla is faster; fl/tar is flotilla over the floor."
echo "== issue 20's goals in this run"
printf '  %s\n' "${goals[@]}"
