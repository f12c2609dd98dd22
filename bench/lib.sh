# Sourced by the benchmarks (fleet.sh, vm.sh, image.sh, state.sh, cache*.sh, ssh-copy.sh; copy.sh
# and cache-push.sh use only `big_path` and `small_paths`): what every one of them sets up the same way. `bench_setup NAME` installs what flotilla needs, builds the release binaries, and
# makes `$work` (a scratch directory under target/bench) and a network namespace `$ns` of the
# benchmark's own, where `fl` runs flotilla (nsenter, not `ip netns exec`: that makes a mount
# namespace per command, hiding the named network namespaces one command makes from the
# next). `bench_cleanup` removes both; a benchmark's own cleanup ends with it.

work="" ns=""

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# best_of N cmd... → the fastest wall time of N runs (the page cache synced before each).
best_of() {
    local n=$1 best="" t0 t1 d
    shift
    for _ in $(seq "$n"); do
        sync
        t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
        d=$(secs "$t0" "$t1")
        if [ -z "$best" ] || awk -v d="$d" -v b="$best" 'BEGIN { exit !(d < b) }'; then best=$d; fi
    done
    echo "$best"
}

# big_path MIB DIR → one store path of real files from /usr/lib, about MIB MiB, staged in DIR
# (removed afterwards): the large closure the copy, cache and image benchmarks share.
big_path() {
    local stage=$2/usr-lib-sample
    mkdir -p "$stage"
    find /usr/lib -xdev -type f -size +0 -printf '%s %p\n' 2>/dev/null | sort -k2 |
        awk -v limit=$(($1 * 1048576)) '{ if (total >= limit) exit; total += $1; print $2 }' |
        xargs -d '\n' cp --parents -t "$stage" 2>/dev/null || true
    nix-store --add "$stage"
    rm -rf "$stage"
}

# small_paths N → one store path referencing N small store paths (2-6 KiB each): the closure
# of N+1 paths the copy benchmarks share.
small_paths() {
    nix-build --no-out-link --option substituters '' -E "
      let p = import $PWD/nix/demo-pkgs.nix { };
          body = i: builtins.concatStringsSep \"\" (builtins.genList (j: \"line \${toString j} of file \${toString i}\\n\") (100 + (i - (i / 200) * 200)));
          files = builtins.genList (i: builtins.toFile \"small-\${toString i}\" (body i)) $1;
      in p.writeText \"many-small-paths\" (builtins.concatStringsSep \"\\n\" files)"
}

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
