#!/usr/bin/env bash
# Benchmark (not a test): publishing a closure as a binary cache directory.
#
# Imports the same big closure as bench/copy.sh (about BIG_MB MiB of /usr/lib as one store
# path), then times side by side, into a fresh directory each run:
#   flotilla   `flotilla cache push DIR PATH --key K` (zstd level 3, NAR checked, signed)
#   nix copy   `nix copy --to 'file://DIR?compression=zstd&secret-key=K'` (the peer)
# and prints each time, the throughput in MiB/s of NAR, and the ratio. Each figure is the best
# of $RUNS runs. bench/cache.sh (serving) may call it; it stands on its own.
#
#   bash bench/cache-push.sh             # about 1 GiB
#   BIG_MB=200 bash bench/cache-push.sh  # a smaller closure
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

BIG_MB=${BIG_MB:-1024}
RUNS=${RUNS:-3}

bash scripts/install-deps.sh
cargo build --release --workspace -q
flotilla=$PWD/target/x86_64-unknown-linux-gnu/release/flotilla
export FLOTILLA_SUBSTITUTERS=""
mkdir -p "${BENCH_DIR:-$PWD/target/bench}"
work=$(mktemp -d "${BENCH_DIR:-$PWD/target/bench}/cache-push.XXXXXX")
trap 'rm -rf "$work"' EXIT
export FLOTILLA_STATE=$work/state.db

best() { sort -g | head -1; }

echo "== preparing the closure" >&2
big=$(big_path "$BIG_MB" "$work/stage")
nar_bytes=$(nix-store -qR "$big" | xargs nix-store -q --size | awk '{ s += $1 } END { print s }')
"$flotilla" cache keygen bench-1 --out "$work/keys" >/dev/null
key=$work/keys/bench-1.secret

run_flotilla() {
    rm -rf "$work/out"; sync
    local t0 t1; t0=$(now)
    "$flotilla" cache push "$work/out" --key "$key" "$big" >/dev/null
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

run_nix() {
    rm -rf "$work/out"; sync
    local t0 t1; t0=$(now)
    nix --extra-experimental-features nix-command copy --option substituters '' \
        --to "file://$work/out?compression=zstd&secret-key=$key" "$big"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

echo "== timing, best of $RUNS ($(awk -v b="$nar_bytes" 'BEGIN { printf "%.0f MiB of NAR", b / 1048576 }'))" >&2
f=$(for _ in $(seq "$RUNS"); do run_flotilla; done | best)
n=$(for _ in $(seq "$RUNS"); do run_nix; done | best)
zst=$(du -sb "$work/out/nar" | cut -f1)
rate() { awk -v b="$nar_bytes" -v t="$1" 'BEGIN { printf "%.0f", b / 1048576 / t }'; }
printf '%-10s %8ss %6s MiB/s\n' "flotilla" "$f" "$(rate "$f")" "nix copy" "$n" "$(rate "$n")"
awk -v f="$f" -v n="$n" 'BEGIN { printf "flotilla cache push takes %.2fx the time of nix copy --to file://\n", f / n }'
echo "compressed: $(awk -v z="$zst" 'BEGIN { printf "%.0f MiB", z / 1048576 }') (nix copy's output), cores: $(nproc)"
