#!/usr/bin/env bash
# Benchmark (not a test): machines as QEMU VMs.
#
# For N VMs (default 1 and 4) of a busybox web server, times:
#   deploy      `flotilla deploy` from scratch: the VMs' disks made, booted, the closure
#               copied in over virtio-serial, activated, the page checked
#   per VM      deploy / N
#   boot floor  a bare `qemu-system-x86_64` boot of the same kernel and initramfs with the same
#               base disk and devices, from QEMU's start to the agent's hello on its
#               virtio-serial port (what every VM start waits for at least), N at once
#   ratio       per VM / (boot floor / N)
# and the memory of each VM's QEMU (RSS, from /proc, with the VMs idle after the deploy).
# TCG unless FLOTILLA_QEMU_ACCEL=kvm (accel = "tcg" in the file: this kind of host's KVM
# hangs guests, and `auto` would add its one-time 8 s probe per deployment to the first
# deploy). Everything runs inside a network namespace of the benchmark's own, removed at the
# end with every VM.
#
#   bash bench/vm.sh               # 1 and 4 VMs
#   SIZES="2" bash bench/vm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"1 4"}

. bench/lib.sh
floor_pids=()
cleanup() {
    for p in "${floor_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for db in "$work"/state-*.db; do [ -e "$db" ] && FLOTILLA_STATE=$db fl destroy --yes >/dev/null 2>&1 || true; done
    bench_cleanup
}
trap cleanup EXIT
bench_setup vm

fleet_file() {
    local n=$1 file=$work/vms-$n.nix
    {
        echo "{ meta.name = \"vmbench$n\";"
        echo "  machines = let vm = { name, pkgs, ... }: {"
        echo "    platform = { type = \"qemu\"; memory = 256; accel = \"${FLOTILLA_QEMU_ACCEL:-tcg}\"; };"
        echo "    boot.kernel = pkgs.linux;"
        echo "    packages = [ pkgs.busybox ];"
        echo "    services.httpd.command = [ \"\${pkgs.busybox}/bin/httpd\" \"-f\" \"-p\" \"80\" \"-h\" \"\${pkgs.writeTextDir \"index.html\" \"<h1>\${name}</h1>\"}\" ];"
        echo "    services.httpd.healthCheck.http = \"http://127.0.0.1/\";"
        echo "  }; in {"
        for i in $(seq -w 1 "$n"); do echo "    vm$i = vm;"; done
        echo "  };"
        echo "}"
    } >"$file"
    echo "$file"
}

# N bare QEMUs booting the first VM's kernel, initramfs and a copy-on-write disk over the same
# base image; prints the seconds until every one said hello on its port.
boot_floor() {
    local n=$1 dir=$2 i t0 pending
    local kernel=$dir/boot/current/kernel initrd=$dir/boot/current/initrd
    local base
    base=$(ls "$(dirname "$dir")"/base-*.img | head -1)
    t0=$(now)
    for i in $(seq 1 "$n"); do
        qemu-img create -q -f qcow2 -F raw -b "$base" "$work/floor-$i.qcow2" 2048M
        qemu-system-x86_64 -M pc -accel "${FLOTILLA_QEMU_ACCEL:-tcg},tb-size=32" -m 256 -nodefaults -no-user-config -display none -no-reboot \
            -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 root=LABEL=flotilla-root panic=-1 flotilla.hostname=floor$i" \
            -drive "file=$work/floor-$i.qcow2,if=virtio,format=qcow2" -device virtio-serial-pci \
            -chardev "socket,id=a0,path=$work/floor-$i.sock,server=on,wait=off" -device virtserialport,chardev=a0,name=flotilla.agent.0 \
            -serial null &
        floor_pids+=($!)
    done
    pending=$n
    for i in $(seq 1 "$n"); do
        until [ -S "$work/floor-$i.sock" ]; do sleep 0.01; done
        timeout 120 python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); buf = b""
while not buf.endswith(b"FLOTILLA-AGENT-HELLO\n"):
    b = s.recv(1)
    if not b: sys.exit(1)
    buf += b
' "$work/floor-$i.sock"
    done
    secs "$t0" "$(now)"
    for p in "${floor_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    floor_pids=()
}

rss_mib() { # the QEMUs of a state DB's VMs: mean RSS in MiB
    local total=0 count=0 pid
    for f in "$1"/*/vm.json; do
        pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")
        total=$((total + $(awk '/VmRSS/ { print $2 }' "/proc/$pid/status")))
        count=$((count + 1))
    done
    echo $((total / count / 1024))
}

printf '%-4s %10s %10s %12s %8s %14s\n' VMs deploy "per VM" "boot floor" ratio "RSS per VM"
for n in $SIZES; do
    FLOTILLA_STATE=$work/state-$n.db
    file=$(fleet_file "$n")
    t0=$(now); fl deploy -f "$file" >"$work/deploy-$n.log" 2>&1 || { cat "$work/deploy-$n.log"; exit 1; }; t1=$(now)
    deploy=$(secs "$t0" "$t1")
    machines=$work/machines/vmbench$n
    rss=$(rss_mib "$machines")
    floor=$(boot_floor "$n" "$machines/vm$(seq -w 1 "$n" | head -1)")
    per=$(awk -v d="$deploy" -v n="$n" 'BEGIN { printf "%.2f", d / n }')
    ratio=$(awk -v p="$per" -v f="$floor" -v n="$n" 'BEGIN { printf "%.2fx", p / (f / n) }')
    printf '%-4s %9ss %9ss %11ss %8s %11s MiB\n' "$n" "$deploy" "$per" "$floor" "$ratio" "$rss"
    fl destroy --yes >/dev/null 2>&1
done
