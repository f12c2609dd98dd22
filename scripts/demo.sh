#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs flotilla's main job on the example fleet: deploy
# three namespace containers (two web servers and a monitor) and a QEMU VM (a third web
# server), then show them working.
# Run as root. Running it again redeploys, which changes nothing. To remove the fleet:
#   target/x86_64-unknown-linux-gnu/release/flotilla destroy -d webfleet --yes
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --workspace --release
bin=target/x86_64-unknown-linux-gnu/release

# No binary cache is reachable offline, and the demo package set stands in for nixpkgs.
export FLOTILLA_SUBSTITUTERS="${FLOTILLA_SUBSTITUTERS-}"
fl() { "$bin/flotilla" -I "nixpkgs=$PWD/nix/demo-pkgs.nix" "$@"; }
example=examples/webfleet/deployment.nix

step() { printf '\n== %s\n' "$*"; }

step "flotilla doctor: is this host ready? (it stops here, with the fix, when it is not)"
fl doctor

step "flotilla deploy -f $example"
fl deploy -f "$example"

step "the web pages, from this host: forwarded loopback ports, then web1's own address"
curl -sSf --retry 5 --retry-connrefused --retry-delay 1 http://127.0.0.1:8081/
curl -sSf --retry 5 --retry-connrefused --retry-delay 1 http://127.0.0.1:8082/
web1_ip=$(fl eval -f "$example" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["facts"]["web1"]["ip"])')
curl -sSf "http://$web1_ip/"

step "from the monitor, through nodes.web1.ip (its /etc/monitor/targets) and by name"
fl exec monitor -- cat /etc/monitor/targets
fl exec monitor -- wget -q -O - "http://$web1_ip/"
fl exec monitor -- wget -q -O - http://web1/

step "the VM's page, from the monitor container by name and from this host's forwarded port, and the VM's own kernel"
fl exec monitor -- wget -q -O - http://vm1/
curl -sSf --retry 5 --retry-connrefused --retry-delay 1 http://127.0.0.1:8083/
fl exec vm1 -- uname -r

step "flotilla info"
fl info -d webfleet

step "flotilla deploy again: nothing changed, so nothing is copied or restarted"
fl deploy -f "$example"

step "an OCI image of web1 (flotilla image --format oci), run with runc in a network namespace of the demo's own"
img=$(mktemp -d /tmp/flotilla-demo-oci.XXXXXX)
ns="flotilla-demo-oci-$$"
ctr="flotilla-demo-web1-$$"
oci_cleanup() {
    runc delete --force "$ctr" >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$img"
}
trap oci_cleanup EXIT
fl image -f "$example" web1 --format oci --tag demo -o "$img/layout"
skopeo inspect "oci:$img/layout:demo" | python3 -c 'import json,sys; i=json.load(sys.stdin); print("layers:", len(i["Layers"]), " labels:", i["Labels"])'
umoci unpack --image "$img/layout:demo" "$img/bundle" >/dev/null
# umoci's config has a network namespace of its own and three capabilities; share the demo's
# namespace, and give the agent the capabilities podman and docker give by default.
python3 - "$img/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
c["process"]["terminal"] = False
caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID",
        "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
for s in ("bounding", "effective", "permitted"):
    c["process"]["capabilities"][s] = caps
json.dump(c, open(p, "w"))
PY
ip netns add "$ns"
nsenter --net="/run/netns/$ns" -- ip link set lo up
# web1's httpd runs as www on port 80: docker and podman let a container's users bind low
# ports (net.ipv4.ip_unprivileged_port_start=0 in its network namespace), as flotilla's
# containers do.
nsenter --net="/run/netns/$ns" -- sysctl -qw net.ipv4.ip_unprivileged_port_start=0
# nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroups runc needs.
nsenter --net="/run/netns/$ns" -- runc run --detach --bundle "$img/bundle" "$ctr"
nsenter --net="/run/netns/$ns" -- curl -sSf --retry 10 --retry-connrefused --retry-delay 1 http://127.0.0.1/
runc kill "$ctr" TERM
for _ in $(seq 1 100); do runc state "$ctr" 2>/dev/null | grep -q '"status": "stopped"' && break; sleep 0.1; done
runc state "$ctr" | grep '"status"'
oci_cleanup
trap - EXIT
