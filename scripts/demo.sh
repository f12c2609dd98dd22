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
