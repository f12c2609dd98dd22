# Sourced by the benchmarks that deploy (fleet.sh, vm.sh): what every one of them sets up the
# same way. `bench_setup NAME` installs what flotilla needs, builds the release binaries, and
# makes `$work` (a scratch directory under target/bench) and a network namespace `$ns` of the
# benchmark's own, where `fl` runs flotilla (nsenter, not `ip netns exec`: that makes a mount
# namespace per command, hiding the named network namespaces one command makes from the
# next). `bench_cleanup` removes both; a benchmark's own cleanup ends with it.

work="" ns=""

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

bench_setup() {
    bash scripts/install-deps.sh
    cargo build --release --workspace -q
    bin=$PWD/target/x86_64-unknown-linux-gnu/release
    mkdir -p "$PWD/target/bench"
    work=$(mktemp -d "$PWD/target/bench/$1.XXXXXX")
    ns=fl$1-$$
    export FLOTILLA_SUBSTITUTERS="" FLOTILLA_STATE
    ip netns add "$ns"
    ip -n "$ns" link set lo up
}

fl() { nsenter --net="/run/netns/$ns" -- "$bin/flotilla" -I "nixpkgs=$PWD/nix/demo-pkgs.nix" "$@"; }

bench_cleanup() {
    [ -z "$ns" ] || ip netns del "$ns" 2>/dev/null || true
    [ -z "$work" ] || rm -rf "$work"
}
