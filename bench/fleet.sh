#!/usr/bin/env bash
# Benchmark (not a test): deploying fleets of local containers.
#
# For 10 and then 50 web servers of the example's kind (busybox httpd serving a page built
# by Nix, each its own namespace container with its own store), times:
#   deploy     `flotilla deploy` from scratch: provision, build, copy, activate, check
#   no-op      the same deploy again, nothing changed
#   one change one machine's page changed, deploy again
#   eval floor a bare `nix-instantiate` of the same deployment's toplevels (eval.nix with the
#              same facts, in read-write mode, as flotilla runs it), the peer the no-op
#              redeploy is measured against (target: within 2x)
#   plan       (with PLAN=1) `flotilla plan` of the same unchanged fleet, against the no-op
#              deploy (goal: no slower than it)
# Each no-op, plan and eval figure is the best of $RUNS. Everything runs inside a network namespace
# of the benchmark's own, removed at the end with every container.
#
#   bash bench/fleet.sh              # 10 and 50 machines
#   SIZES="10" bash bench/fleet.sh   # only 10
#   PLAN=1 SIZES=50 bash bench/fleet.sh   # also plan against the no-op deploy
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"10 50"}
RUNS=${RUNS:-5}
PLAN=${PLAN:-}

. bench/lib.sh
cleanup() {
    fl destroy --yes >/dev/null 2>&1 || true
    bench_cleanup
}
trap cleanup EXIT
bench_setup fleet

# N web servers; web01's page says $1.
fleet_file() {
    local n=$1 page=$2 file=$work/fleet-$n.nix
    {
        echo "{ meta.name = \"bench$n\";"
        echo "  defaults = { pkgs, ... }: { packages = [ pkgs.busybox ]; binsh = \"\${pkgs.busybox}/bin/sh\"; };"
        echo "  machines = let web = text: { name, pkgs, ... }: {"
        echo "    tags = [ \"web\" ];"
        echo "    users.www = { home = \"/var/empty\"; };"
        echo "    services.httpd = { user = \"www\"; command = [ \"\${pkgs.busybox}/bin/httpd\" \"-f\" \"-p\" \"80\" \"-h\" \"\${pkgs.writeTextDir \"index.html\" \"<h1>\${text} from \${name}</h1>\"}\" ]; };"
        echo "  }; in {"
        for i in $(seq -w 1 "$n"); do
            if [ "$i" = "$(seq -w 1 "$n" | head -1)" ]; then echo "    web$i = web \"$page\";"; else echo "    web$i = web \"Hello\";"; fi
        done
        echo "  };"
        echo "}"
    } >"$file"
    echo "$file"
}

printf '%-9s %10s %10s %12s %12s %14s\n' machines deploy no-op "one change" "eval floor" "no-op / eval"
for n in $SIZES; do
    FLOTILLA_STATE=$work/state-$n.db # one deployment per state DB: commands need no -d
    file=$(fleet_file "$n" Hello)
    t0=$(now); fl deploy -f "$file" --parallel 8 >"$work/deploy-$n.log" 2>&1 || { cat "$work/deploy-$n.log"; exit 1; }; t1=$(now)
    deploy=$(secs "$t0" "$t1")
    grep -q "$n of $n machines ok" "$work/deploy-$n.log" || { cat "$work/deploy-$n.log"; exit 1; }

    noop=$(best_of "$RUNS" fl deploy -f "$file")
    fl deploy -f "$file" | grep -c unchanged | grep -qx "$n" || { echo "the no-op redeploy changed something" >&2; exit 1; }

    if [ -n "$PLAN" ]; then
        planned=$(best_of "$RUNS" fl plan -f "$file")
        fl plan -f "$file" | grep -q "plan: 0 changing, $n unchanged, 0 new" || { echo "the plan of the unchanged fleet is not all unchanged" >&2; exit 1; }
        printf 'plan of %s unchanged machines: %ss, no-op deploy %ss: %.2fx\n' "$n" "$planned" "$noop" "$(awk -v a="$planned" -v b="$noop" 'BEGIN { print a / b }')"
    fi

    # The peer: evaluate and instantiate the same toplevels with the same facts, nothing else.
    facts=$(fl eval -f "$file" --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["facts"]))')
    # Run through the same nsenter as flotilla, so both carry the harness's few milliseconds.
    evalfloor=$(best_of "$RUNS" nsenter --net="/run/netns/$ns" -- nix-instantiate --option substituters '' -I "nixpkgs=$PWD/nix/demo-pkgs.nix" \
        --eval --strict --json --read-write-mode "$PWD/nix/eval.nix" -A toplevels \
        --argstr deployment "$file" --argstr factsJson "$facts" --argstr agent "$bin/flotilla-agent" --argstr only "")

    changed=$(fleet_file "$n" Changed)
    t0=$(now); fl deploy -f "$changed" >"$work/change-$n.log" 2>&1; t1=$(now)
    change=$(secs "$t0" "$t1")
    [ "$(grep -c ' deployed ' "$work/change-$n.log")" = 1 ] || { cat "$work/change-$n.log"; exit 1; }

    printf '%-9s %9ss %9ss %11ss %11ss %13.2fx\n' "$n" "$deploy" "$noop" "$change" "$evalfloor" "$(awk -v a="$noop" -v b="$evalfloor" 'BEGIN { print a / b }')"
    fl destroy --yes >/dev/null
done
