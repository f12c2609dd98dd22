#!/usr/bin/env bash
# Runs every test: installs what they need first (the same script the demo uses), then the
# whole workspace's unit and integration tests against real Nix.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
export FLOTILLA_SUBSTITUTERS=""
cargo build --workspace
cargo test --workspace "$@"
