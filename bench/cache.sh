#!/usr/bin/env bash
# Benchmark (not a test): `flotilla cache serve` against nginx serving the same cache directory
# statically, side by side in one run, both on 127.0.0.1 inside the benchmark's own network
# namespace, measured with wrk:
#   narinfo   requests/s and p50/p99 latency, 1 and 16 connections, cycling over every narinfo
#   NAR       MiB/s of uncompressed NAR delivered (requests/s x NarSize), 1 and 16 connections,
#             the same .nar.zst files
# and prints flotilla's ratio to nginx (the goal: >= 0.8x nginx's narinfo throughput, p99
# within 1.5x). The cache is written by `nix copy --to file://...?compression=zstd` (what
# `flotilla cache push` writes too).
#
#   bash bench/cache.sh                      # 2,000 narinfos, a NAR of about 64 MiB, 10 s each
#   PATHS=500 NAR_MB=16 DURATION=5 bash bench/cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

PATHS=${PATHS:-2000}
NAR_MB=${NAR_MB:-64}
DURATION=${DURATION:-10}

# Bench-only tools (the tests need neither): Debian's nginx and wrk.
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    # policy-rc.d keeps the package's service from starting on the host's port 80.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || { rm -f /usr/sbin/policy-rc.d; exit 1; }
    rm -f /usr/sbin/policy-rc.d
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

bench_setup cache
nginx_pid="" flotilla_pid=""
cleanup() {
    [ -z "$nginx_pid" ] || kill "$nginx_pid" 2>/dev/null || true
    [ -z "$flotilla_pid" ] || kill "$flotilla_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    bench_cleanup
}
trap cleanup EXIT
inns() { nsenter --net="/run/netns/$ns" -- "$@"; }

echo "== preparing the cache ($PATHS small paths, a ${NAR_MB} MiB NAR)" >&2
nix-store --generate-binary-cache-key bench-cache-1 "$work/key.secret" "$work/key.public"
small=$(nix-build --no-out-link --option substituters '' -E "
  let p = import $PWD/nix/demo-pkgs.nix { };
      files = builtins.genList (i: builtins.toFile \"small-\${toString i}-$$\" \"file \${toString i} of run $$\\n\") $PATHS;
  in p.writeText \"bench-cache-root\" (builtins.concatStringsSep \"\\n\" files)")
stage=$work/stage/usr-lib-sample
mkdir -p "$stage"
find /usr/lib -xdev -type f -size +0 -printf '%s %p\n' 2>/dev/null | sort -k2 |
    awk -v limit=$((NAR_MB * 1048576)) '{ if (total >= limit) exit; total += $1; print $2 }' |
    xargs -d '\n' cp --parents -t "$stage" 2>/dev/null || true
big=$(nix-store --add "$stage")
cache=$work/cache
nix copy --extra-experimental-features nix-command --option substituters '' \
    --to "file://$cache?compression=zstd&secret-key=$work/key.secret" "$small" "$big"
ls "$cache"/*.narinfo | sed "s|^$cache||" >"$work/narinfos.txt"
big_narinfo=$cache/$(basename "$big" | cut -c1-32).narinfo
big_url=/$(sed -n 's/^URL: //p' "$big_narinfo")
big_nar_size=$(sed -n 's/^NarSize: //p' "$big_narinfo")
big_file_size=$(sed -n 's/^FileSize: //p' "$big_narinfo")
echo "   $(wc -l <"$work/narinfos.txt") narinfos; NAR $((big_nar_size / 1048576)) MiB, $((big_file_size / 1048576)) MiB compressed" >&2

cat >"$work/narinfos.lua" <<LUA
local paths, i = {}, 0
for line in io.lines("$work/narinfos.txt") do paths[#paths + 1] = line end
request = function()
    i = i % #paths + 1
    return wrk.format("GET", paths[i])
end
LUA

cat >"$work/nginx.conf" <<NGINX
daemon off;
user root;
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx.error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 60;
    types { text/x-nix-narinfo narinfo; application/x-nix-nar zst; }
    server {
        listen 127.0.0.1:18081;
        root $cache;
    }
}
NGINX

inns "$NGINX" -c "$work/nginx.conf" &
nginx_pid=$!
inns "$bin/flotilla" cache serve "$cache" --bind 127.0.0.1:18082 2>"$work/flotilla.log" &
flotilla_pid=$!
for port in 18081 18082; do
    for _ in $(seq 100); do inns curl -sf "http://127.0.0.1:$port/nix-cache-info" >/dev/null && break; sleep 0.1; done
    inns curl -sf "http://127.0.0.1:$port/nix-cache-info" >/dev/null || { echo "nothing answers on $port" >&2; cat "$work"/*.log >&2; exit 1; }
done
# Both serve the same bytes.
cmp <(inns curl -s "http://127.0.0.1:18081$big_url") <(inns curl -s "http://127.0.0.1:18082$big_url")

# wrk's figures: requests/s, p50 and p99 in ms.
measure() { # port connections path [wrk args...]
    local port=$1 c=$2 path=$3; shift 3
    local threads=$((c < 2 ? 1 : 2))
    inns wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency "$@" "http://127.0.0.1:$port$path" |
        awk '
            function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
            /Requests\/sec:/ { rps = $2 }
            $1 == "50.000%" || $1 == "50%" { p50 = ms($2) }
            $1 == "99.000%" || $1 == "99%" { p99 = ms($2) }
            END { printf "%.0f %.3f %.3f\n", rps, p50, p99 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2fx", a / b }'; }

echo
echo "flotilla cache serve vs nginx $("$NGINX" -v 2>&1 | sed 's|.*/||'), same cache, ${DURATION}s each, wrk"
printf '%-22s %14s %14s %10s\n' "" nginx flotilla ratio
for c in 1 16; do
    read -r n_rps n_p50 n_p99 < <(measure 18081 "$c" / -s "$work/narinfos.lua")
    read -r f_rps f_p50 f_p99 < <(measure 18082 "$c" / -s "$work/narinfos.lua")
    printf '%-22s %14s %14s %10s\n' "narinfo c=$c req/s" "$n_rps" "$f_rps" "$(ratio "$f_rps" "$n_rps")"
    printf '%-22s %14s %14s %10s\n' "narinfo c=$c p50 ms" "$n_p50" "$f_p50" "$(ratio "$f_p50" "$n_p50")"
    printf '%-22s %14s %14s %10s\n' "narinfo c=$c p99 ms" "$n_p99" "$f_p99" "$(ratio "$f_p99" "$n_p99")"
done
for c in 1 16; do
    read -r n_rps _ _ < <(measure 18081 "$c" "$big_url")
    read -r f_rps _ _ < <(measure 18082 "$c" "$big_url")
    n_mib=$(awk -v r="$n_rps" -v s="$big_nar_size" 'BEGIN { printf "%.0f", r * s / 1048576 }')
    f_mib=$(awk -v r="$f_rps" -v s="$big_nar_size" 'BEGIN { printf "%.0f", r * s / 1048576 }')
    printf '%-22s %14s %14s %10s\n' "NAR c=$c MiB/s" "$n_mib" "$f_mib" "$(ratio "$f_mib" "$n_mib")"
done
