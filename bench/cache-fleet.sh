#!/usr/bin/env bash
# Benchmark (not a test): a fleet fetching its closures from a cache (issue 17).
#
# N local machines (default 8) of the example's web server kind (busybox httpd serving a page
# built by Nix, each its own namespace container with its own store), deployed from scratch
# twice: once pushed by the deployer as usual, once with `--substitute-on-destination` from a
# `flotilla cache serve --store` (this host's store, signed on the fly) in the benchmark's
# namespace, which the machines reach on the bridge's address. For each: the bytes the
# deployer sent (summed from `deploy --json`), the bytes the machines fetched from the cache,
# and the wall time. The toplevels are built beforehand, so both runs time the copy and
# activation, not the build. The server's compressed NARs start cold (made on first request,
# as a fresh `--store` server's are).
#
#   bash bench/cache-fleet.sh
#   N=16 bash bench/cache-fleet.sh
#   N=2 BLOBS=16 bash bench/cache-fleet.sh  # each machine also holds 16 paths of 8 MiB (random,
#                                          # so incompressible): a bigger closure of many paths
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-8}
BLOBS=${BLOBS:-0}
GATEWAY=10.231.0.1 # the bridge's address on the default subnet, in the benchmark's namespace
PORT=5000

. bench/lib.sh
server=""
cleanup() {
    for db in "$work"/state-*.db; do [ -e "$db" ] && FLOTILLA_STATE=$db fl destroy --yes >/dev/null 2>&1 || true; done
    [ -z "$server" ] || kill "$server" 2>/dev/null || true
    bench_cleanup
}
trap cleanup EXIT
bench_setup cachefleet

nix-store --generate-binary-cache-key bench-cache-1 "$work/key.secret" "$work/key.public"
pk=$(cat "$work/key.public")
nsenter --net="/run/netns/$ns" -- "$bin/flotilla" cache serve --store --key "$work/key.secret" --cache-dir "$work/serve" \
    --bind "0.0.0.0:$PORT" 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do nsenter --net="/run/netns/$ns" -- curl -sf "http://127.0.0.1:$PORT/nix-cache-info" >/dev/null && break; sleep 0.1; done

file=$work/fleet.nix
{
    echo "{ meta.name = \"cachefleet\";"
    echo "  defaults = { pkgs, ... }: {"
    echo "    packages = [ pkgs.busybox ] ++ map (i: pkgs.runCommand \"blob-\${toString i}\" { } \"mkdir \$out; head -c 8388608 /dev/urandom > \$out/blob\") (builtins.genList (i: i) $BLOBS);"
    echo "    binsh = \"\${pkgs.busybox}/bin/sh\";"
    echo "    deploy = { substituters = [ \"http://$GATEWAY:$PORT\" ]; trustedPublicKeys = [ \"$pk\" ]; };"
    echo "  };"
    echo "  machines = let web = { name, pkgs, ... }: {"
    echo "    users.www = { home = \"/var/empty\"; };"
    echo "    services.httpd = { user = \"www\"; command = [ \"\${pkgs.busybox}/bin/httpd\" \"-f\" \"-p\" \"80\" \"-h\" \"\${pkgs.writeTextDir \"index.html\" \"<h1>Hello from \${name}</h1>\"}\" ]; };"
    echo "  }; in {"
    for i in $(seq -w 1 "$N"); do echo "    web$i = web;"; done
    echo "  };"
    echo "}"
} >"$file"

# run NAME ARGS... → "seconds sent fetched" of a from-scratch deploy in a state DB of its own
run() {
    local name=$1 t0 t1
    shift
    FLOTILLA_STATE=$work/state-$name.db
    fl build -f "$file" >/dev/null
    t0=$(now)
    fl deploy -f "$file" --json --parallel 8 "$@" >"$work/$name.json" 2>"$work/$name.log" || { tail -5 "$work/$name.json" "$work/$name.log"; exit 1; }
    t1=$(now)
    tail -1 "$work/$name.json" | python3 -c '
import json, sys
r = json.load(sys.stdin)
rows = r["machines"]
bad = [m["machine"] for m in rows if m["outcome"] not in ("deployed", "unchanged")]
assert not bad and len(rows) == int(sys.argv[2]), ("not deployed", bad)
sent = sum(m["copy"]["bytes_sent"] for m in rows if m.get("copy"))
fetched = sum((m["copy"].get("substituted") or {}).get("bytes", 0) for m in rows if m.get("copy"))
print(sys.argv[1], sent, fetched)' "$(secs "$t0" "$t1")" "$N"
    fl destroy --yes >/dev/null
}

read -r push_s push_sent push_fetched < <(run push)
read -r sub_s sub_sent sub_fetched < <(run subst --substitute-on-destination)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
printf '%-28s %14s %16s %10s\n' "$N machines, from scratch" "deployer sent" "fetched by them" "wall"
printf '%-28s %14s %16s %9ss\n' "pushed by the deployer" "$(mib "$push_sent")" "$(mib "$push_fetched")" "$push_s"
printf '%-28s %14s %16s %9ss\n' "--substitute-on-destination" "$(mib "$sub_sent")" "$(mib "$sub_fetched")" "$sub_s"
awk -v a="$sub_sent" -v b="$push_sent" -v s="$sub_s" -v p="$push_s" \
    'BEGIN { printf "deployer bytes: %.4fx of pushing; wall time: %.2fx\n", (b ? a / b : 0), (p ? s / p : 0) }'
