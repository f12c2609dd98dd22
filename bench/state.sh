#!/usr/bin/env bash
# Benchmark (not a test): the state backends. The same fleet of N web servers (bench/fleet.sh's
# kind) is deployed with an SQLite state file and then with a PostgreSQL database (a throwaway
# cluster this script starts under /tmp on a unix socket, as the tests do, and removes), and a
# no-op redeploy is timed on each (best of $RUNS): what the state costs a deploy that changes
# nothing. Goal: PostgreSQL within 1.5x of SQLite.
#
#   bash bench/state.sh            # 50 machines
#   N=10 RUNS=3 bash bench/state.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-50}
RUNS=${RUNS:-5}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

. bench/lib.sh
pgdir=""
cleanup() {
    fl destroy --yes >/dev/null 2>&1 || true
    if [ -n "$pgdir" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$pgdir"
    fi
    bench_cleanup
}
trap cleanup EXIT
bench_setup state

file=$work/fleet.nix
{
    echo "{ meta.name = \"bench$N\";"
    echo "  defaults = { pkgs, ... }: { packages = [ pkgs.busybox ]; binsh = \"\${pkgs.busybox}/bin/sh\"; };"
    echo "  machines = let web = { name, pkgs, ... }: {"
    echo "    services.httpd.command = [ \"\${pkgs.busybox}/bin/httpd\" \"-f\" \"-p\" \"80\" \"-h\" \"\${pkgs.writeTextDir \"index.html\" \"<h1>Hello from \${name}</h1>\"}\" ];"
    echo "  }; in {"
    for i in $(seq -w 1 "$N"); do echo "    web$i = web;"; done
    echo "  };"
    echo "}"
} >"$file"

# The PostgreSQL cluster: run as the package's user, listening only on a socket in its own
# directory (under /tmp: the postgres user cannot reach into $work).
pgdir=$(mktemp -d /tmp/flotilla-bench-pg.XXXXXX)
chown postgres: "$pgdir"
runuser -u postgres -- "$PGBIN/initdb" -D "$pgdir/data" -U flotilla --auth=trust -E UTF8 --no-sync >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -o "-k $pgdir -c listen_addresses=" -w start >/dev/null
runuser -u postgres -- "$PGBIN/psql" -h "$pgdir" -U flotilla -d postgres -qc "CREATE DATABASE bench" >/dev/null

printf '%-11s %10s %10s\n' state deploy no-op
declare -A noop
for backend in sqlite postgres; do
    case $backend in
        sqlite) FLOTILLA_STATE=$work/state.db ;;
        postgres) FLOTILLA_STATE="postgres://flotilla@${pgdir//\//%2F}/bench" ;;
    esac
    export FLOTILLA_STATE FLOTILLA_DATA=$work/data-$backend
    t0=$(now); fl deploy -f "$file" --parallel 8 >"$work/deploy-$backend.log" 2>&1 || { cat "$work/deploy-$backend.log"; exit 1; }; t1=$(now)
    grep -q "$N of $N machines ok" "$work/deploy-$backend.log" || { cat "$work/deploy-$backend.log"; exit 1; }
    noop[$backend]=$(best_of "$RUNS" fl deploy -f "$file")
    fl deploy -f "$file" 2>/dev/null | grep -c unchanged | grep -qx "$N" || { echo "the no-op redeploy changed something" >&2; exit 1; }
    printf '%-11s %9ss %9ss\n' "$backend" "$(secs "$t0" "$t1")" "${noop[$backend]}"
    fl destroy --yes >/dev/null
done
printf 'no-op redeploy, PostgreSQL / SQLite: %.2fx (goal: at most 1.5x)\n' "$(awk -v a="${noop[postgres]}" -v b="${noop[sqlite]}" 'BEGIN { print a / b }')"
