#!/usr/bin/env bash
# Benchmark (not a test): copying closures into a fresh machine root.
#
# Builds two closures in the local store, then times side by side, on the same paths:
#   flotilla   `flotilla debug copy-to-root` (a real agent on a fresh root, NARs over a socket)
#   nix copy   `nix copy --to 'local?root=DIR'` (Nix's own copy into a chroot store)
#   cp -a      copying the store paths' directories (the floor: no hashing, no protocol)
# and prints each time with its ratio to the others. Each figure is the best of $RUNS runs.
#
#   bash bench/copy.sh            # about 1 GB of /usr/lib plus 2,000 small paths
#   BIG_MB=200 bash bench/copy.sh # a smaller big closure
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

BIG_MB=${BIG_MB:-1024}
SMALL_PATHS=${SMALL_PATHS:-2000}
RUNS=${RUNS:-3}

bash scripts/install-deps.sh
cargo build --release --workspace -q
flotilla=$PWD/target/x86_64-unknown-linux-gnu/release/flotilla
export FLOTILLA_SUBSTITUTERS="" FLOTILLA_STATE
# All three copy into the same directory tree (on this machine /var/tmp made metadata-heavy
# writes 4x slower than the checkout's filesystem for every tool; BENCH_DIR picks another).
mkdir -p "${BENCH_DIR:-$PWD/target/bench}"
work=$(mktemp -d "${BENCH_DIR:-$PWD/target/bench}/copy.XXXXXX")
FLOTILLA_STATE=$work/state.db
cleanup() {
    pkill -f "flotilla-agent init --root $work" 2>/dev/null || true
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT


echo "== preparing closures" >&2
# Big: real files from /usr/lib, about BIG_MB MiB, imported as one store path.
big=$(big_path "$BIG_MB" "$work/stage")
# Many: SMALL_PATHS small store paths (2-6 KiB each), all referenced by one root.
many=$(small_paths "$SMALL_PATHS")

size_of() { nix-store -qR "$1" | xargs nix-store -q --size | awk '{ s += $1 } END { printf "%.1f MiB", s / 1048576 }'; }

best() { sort -g | head -1; }

run_flotilla() { # root-path dir
    local t0 t1
    sync  # start each run with no dirty pages of the previous one being written back
    t0=$(now)
    "$flotilla" debug copy-to-root "$2" "$1" >/dev/null
    t1=$(now)
    pkill -f "flotilla-agent init --root $2" 2>/dev/null || true
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

run_nix() {
    local t0 t1
    sync  # start each run with no dirty pages of the previous one being written back
    t0=$(now)
    nix --extra-experimental-features nix-command copy --no-check-sigs --option substituters '' --to "local?root=$2" "$1"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

run_cp() {
    local t0 t1
    mkdir -p "$2/nix/store"
    sync
    t0=$(now)
    nix-store -qR "$1" | xargs cp -a -t "$2/nix/store"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

printf '\n%-22s %10s %10s %10s %12s %12s\n' closure flotilla "nix copy" "cp -a" "fl/nix" "fl/cp"
for name in big many; do
    root=${!name}
    n=$(nix-store -qR "$root" | wc -l)
    declare -a tf=() tn=() tc=()
    for i in $(seq "$RUNS"); do
        tf+=("$(run_flotilla "$root" "$work/fl-$name-$i")")
        tn+=("$(run_nix "$root" "$work/nix-$name-$i")")
        tc+=("$(run_cp "$root" "$work/cp-$name-$i")")
        chmod -R u+w "$work/fl-$name-$i" "$work/nix-$name-$i" "$work/cp-$name-$i"
        rm -rf "$work/fl-$name-$i" "$work/nix-$name-$i" "$work/cp-$name-$i"
    done
    f=$(printf '%s\n' "${tf[@]}" | best)
    x=$(printf '%s\n' "${tn[@]}" | best)
    c=$(printf '%s\n' "${tc[@]}" | best)
    label="$name ($n paths, $(size_of "$root"))"
    printf '%-22s %9.2fs %9.2fs %9.2fs %11.2fx %11.2fx\n' "$label" "$f" "$x" "$c" "$(awk -v a="$f" -v b="$x" 'BEGIN { print a / b }')" "$(awk -v a="$f" -v b="$c" 'BEGIN { print a / b }')"
done
echo
echo "fl/nix < 1 means flotilla is faster than nix copy; fl/cp is flotilla's time over the cp -a floor." >&2
