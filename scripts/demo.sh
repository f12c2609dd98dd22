#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs flotilla's main job on the example fleet.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --workspace --release
bin=target/x86_64-unknown-linux-gnu/release

# No binary cache is reachable offline, and the demo package set stands in for nixpkgs.
export FLOTILLA_SUBSTITUTERS="${FLOTILLA_SUBSTITUTERS-}"
nixpkgs=(-I "nixpkgs=$PWD/nix/demo-pkgs.nix")
example=examples/webfleet/deployment.nix

"$bin/flotilla" "${nixpkgs[@]}" eval -f "$example"
"$bin/flotilla" "${nixpkgs[@]}" build -f "$example"
"$bin/flotilla" info -d webfleet
