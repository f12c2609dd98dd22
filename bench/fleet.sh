#!/usr/bin/env bash
# Benchmark (not a test): deploying fleets of local containers, each phase beside its floor.
#
# For N web servers of the example's kind (busybox httpd serving a page built by Nix, each
# its own namespace container with its own store), for each N in $SIZES, times:
#   deploy     `flotilla deploy --json` from scratch: provision, build, copy, activate, check;
#              its phases timed from its own events (bench/phases.py), and its peak memory:
#              /usr/bin/time -v's maximum resident set (flotilla or any Nix it ran, whichever
#              was largest) and flotilla's own VmHWM
#   no-op      the same deploy again, nothing changed (best of $RUNS)
#   one change one machine's page changed, deploy again
# and, in the same run, the floors each is read against:
#   eval       a bare `nix-instantiate` of the same toplevels (eval.nix with the same facts, in
#              read-write mode, as flotilla runs it): the no-op's floor (goal: within 2x)
#   build      one `nix-store --realise` of as many trivial derivations (each writes a small
#              file with busybox sh) as the deploy built: the build phase's floor
#   copy       `cp -a` of one machine's closure into N fresh directories, 8 at a time
#              (flotilla's default copy limit): the copy phase's floor
#   start      N bare `unshare --mount --pid --fork` + busybox httpd processes, each on its
#              own port, started until every one answers: the floor of provision + activate
# Every toplevel carries this run's nonce, so each run's deploy really builds. Everything runs
# inside a network namespace of the benchmark's own, removed at the end with every container.
# At the end it says which of issue 20's goals this run met.
#
#   bash bench/fleet.sh                       # 10 and 100 machines
#   SIZES="10 100 1000" bash bench/fleet.sh   # and 1,000 (minutes; ~5 MiB of disk a machine, twice)
#   PLAN=1 SIZES=50 bash bench/fleet.sh       # also plan against the no-op deploy
#   PARALLEL=8 bash bench/fleet.sh            # deploy with --parallel 8 (every phase); unset,
#                                             # flotilla's own per-phase limits
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"10 100"}
RUNS=${RUNS:-3}
PARALLEL=${PARALLEL:-}
limits=()
[ -z "$PARALLEL" ] || limits=(--parallel "$PARALLEL")
PLAN=${PLAN:-}

. bench/lib.sh
starters=()
cleanup() {
    [ ${#starters[@]} -eq 0 ] || kill -KILL "${starters[@]}" 2>/dev/null || true
    fl destroy --yes >/dev/null 2>&1 || true
    bench_cleanup
}
trap cleanup EXIT
bench_setup fleet
[ -x /usr/bin/time ] || { echo "fleet.sh: /usr/bin/time is missing (Debian: time); run scripts/install-deps.sh" >&2; exit 2; }
nonce=$(date +%s%N)
busybox=$(nix-build --no-out-link --option substituters '' "$PWD/nix/demo-pkgs.nix" -A busybox)

# N web servers; web01's page says $2.
fleet_file() {
    local n=$1 page=$2 file=$work/fleet-$n-$2.nix first
    first=$(seq -w 1 "$n" | sed -n 1p)
    {
        echo "{ meta.name = \"bench$n\";"
        echo "  defaults = { pkgs, ... }: { packages = [ pkgs.busybox ]; binsh = \"\${pkgs.busybox}/bin/sh\"; files.\"/etc/bench-run\".text = \"$nonce\"; platform.subnet = \"10.231.0.0/20\"; };"
        echo "  machines = let web = text: { name, pkgs, ... }: {"
        echo "    tags = [ \"web\" ];"
        echo "    users.www = { home = \"/var/empty\"; };"
        echo "    services.httpd = { user = \"www\"; command = [ \"\${pkgs.busybox}/bin/httpd\" \"-f\" \"-p\" \"80\" \"-h\" \"\${pkgs.writeTextDir \"index.html\" \"<h1>\${text} from \${name}</h1>\"}\" ]; };"
        echo "  }; in {"
        for i in $(seq -w 1 "$n"); do
            if [ "$i" = "$first" ]; then echo "    web$i = web \"$page\";"; else echo "    web$i = web \"Hello\";"; fi
        done
        echo "  };"
        echo "}"
    } >"$file"
    echo "$file"
}

# measure NAME flotilla-args... → runs `flotilla ARGS --json` under /usr/bin/time -v and
# bench/phases.py; sets wall, hwm (MiB), maxrss (MiB), built, phase_* and keeps the events in
# $work/NAME.events. Fails the benchmark if flotilla did.
measure() {
    local name=$1 figures
    shift
    unset "${!phase_@}" 2>/dev/null || true
    figures=$(python3 bench/phases.py "$work/$name.events" -- /usr/bin/time -v -o "$work/$name.time" \
        nsenter --net="/run/netns/$ns" -- "$bin/flotilla" -I "nixpkgs=$PWD/nix/demo-pkgs.nix" "$@" --json 2>"$work/$name.log")
    local exit wall hwm_kib built
    eval "$figures"
    [ "$exit" = 0 ] || { echo "== flotilla $* failed ($exit):" >&2; tail -20 "$work/$name.log" >&2; tail -5 "$work/$name.events" >&2; exit 1; }
    hwm=$(awk -v k="$hwm_kib" 'BEGIN { printf "%.0f", k / 1024 }')
    maxrss=$(awk '/Maximum resident set size/ { printf "%.0f", $NF / 1024 }' "$work/$name.time")
    m_wall=$wall m_built=$built
}
# outcomes NAME OUTCOME → how many machines the run NAME ended with OUTCOME.
outcomes() { grep '"event":"machine-finished"' "$work/$1.events" | grep -c "\"outcome\":\"$2\"" || true; }
ph() { local v="phase_$1"; echo "${!v:-0}"; }
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a + b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# build_floor K → seconds of one `nix-store --realise` of K fresh trivial derivations.
build_floor() {
    local k=$1 drvs t0 t1
    [ "$k" -gt 0 ] || { echo 0; return; }
    drvs=$(nix-instantiate --option substituters '' -E "
      builtins.genList (i: derivation {
        name = \"floor-$nonce-\${toString i}\"; system = builtins.currentSystem;
        builder = \"$busybox/bin/sh\"; args = [ \"-c\" \"echo \${toString i} > \$out\" ];
      }) $k" 2>/dev/null)
    sync
    t0=$(now); nix-store --realise --option substituters '' $drvs >/dev/null 2>&1; t1=$(now)
    secs "$t0" "$t1"
}

# copy_floor N TOPLEVEL → seconds of `cp -a` of TOPLEVEL's closure into N fresh roots.
copy_floor() {
    local n=$1 top=$2 dir=$work/cp-floor t0 t1
    mkdir -p "$dir"
    nix-store -qR "$top" >"$dir.paths"
    for i in $(seq "$n"); do mkdir -p "$dir/$i/nix/store"; done
    sync
    t0=$(now)
    seq "$n" | xargs -P 8 -I{} sh -c "xargs cp -a -t '$dir/{}/nix/store' <'$dir.paths'"
    t1=$(now)
    chmod -R u+w "$dir" && rm -rf "$dir" "$dir.paths"
    secs "$t0" "$t1"
}

# start_floor N → seconds until N bare namespace + busybox httpd processes all answer.
start_floor() {
    local n=$1 dir=$work/start-floor t0 t1 port
    mkdir -p "$dir" && echo ok >"$dir/index.html"
    starters=()
    t0=$(now)
    for i in $(seq "$n"); do
        nsenter --net="/run/netns/$ns" -- unshare --mount --pid --fork --kill-child \
            "$busybox/bin/httpd" -f -p "127.0.0.1:$((20000 + i))" -h "$dir" &
        starters+=($!)
    done
    for i in $(seq "$n"); do
        port=$((20000 + i))
        until nsenter --net="/run/netns/$ns" -- "$busybox/bin/wget" -q -O /dev/null "http://127.0.0.1:$port/" 2>/dev/null; do :; done
    done
    t1=$(now)
    # unshare ignores TERM while it waits for its child; --kill-child takes the httpd with it.
    kill -KILL "${starters[@]}" 2>/dev/null || true
    wait "${starters[@]}" 2>/dev/null || true
    starters=()
    secs "$t0" "$t1"
}

goals=()
goal() { # description met?
    if [ "$2" = yes ]; then goals+=("met:     $1"); else goals+=("NOT met: $1"); fi
}
row() { printf '  %-44s %10s %10s %8s\n' "$@"; }

for n in $SIZES; do
    FLOTILLA_STATE=$work/state-$n.db # one deployment per state DB: commands need no -d
    file=$(fleet_file "$n" Hello)

    measure "deploy-$n" deploy -f "$file" "${limits[@]}"
    deploy=$m_wall deploy_hwm=$hwm deploy_rss=$maxrss built=$m_built
    d_provision=$(ph provision) d_build=$(ph build) d_copy=$(ph copy) d_activate=$(ph activate)
    outcomes "deploy-$n" deployed | grep -qx "$n" || { echo "not all $n machines were deployed" >&2; tail "$work/deploy-$n.events" >&2; exit 1; }
    # (grep -m1 and sed, not head: under pipefail a writer cut off by head fails the script.)
    top=$(grep -m1 -o '"machine":"web[0-9]*","phase":"build","ok":true,"detail":"[^"]*"' "$work/deploy-$n.events" | sed 's/.*"detail":"\([^"]*\)"/\1/')
    [ -n "$top" ] && [ -e "$top" ] || { echo "no toplevel in the deploy's build events" >&2; exit 1; }

    noop="" noop_hwm="" noop_rss=""
    for _ in $(seq "$RUNS"); do
        sync
        measure "noop-$n" deploy -f "$file" "${limits[@]}"
        if [ -z "$noop" ] || lt "$m_wall" "$noop"; then noop=$m_wall; fi
        noop_hwm=$hwm noop_rss=$maxrss
    done
    outcomes "noop-$n" unchanged | grep -qx "$n" || { echo "the no-op redeploy changed something" >&2; exit 1; }

    if [ -n "$PLAN" ]; then
        planned=$(best_of "$RUNS" fl plan -f "$file")
        fl plan -f "$file" | grep -q "plan: 0 changing, $n unchanged, 0 new" || { echo "the plan of the unchanged fleet is not all unchanged" >&2; exit 1; }
        printf 'plan of %s unchanged machines: %ss, no-op deploy %ss: %.2fx\n' "$n" "$planned" "$noop" "$(awk -v a="$planned" -v b="$noop" 'BEGIN { print a / b }')"
    fi

    # The eval floor: the same toplevels with the same facts, nothing else, through the same
    # nsenter as flotilla, so both carry the harness's few milliseconds.
    facts=$(fl eval -f "$file" --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["facts"]))')
    evalfloor=$(best_of "$RUNS" nsenter --net="/run/netns/$ns" -- nix-instantiate --option substituters '' -I "nixpkgs=$PWD/nix/demo-pkgs.nix" \
        --eval --strict --json --read-write-mode "$PWD/nix/eval.nix" -A toplevels \
        --argstr deployment "$file" --argstr factsJson "$facts" --argstr agent "$bin/flotilla-agent" --argstr only "")

    changed=$(fleet_file "$n" Changed)
    measure "change-$n" deploy -f "$changed" "${limits[@]}"
    change=$m_wall
    outcomes "change-$n" deployed | grep -qx 1 || { echo "the one-change deploy did not deploy exactly one machine" >&2; exit 1; }
    # That machine's own copy and activation (with its checks and confirmation): the events'
    # spans from its copy to its confirmation.
    one=$(add "$(add "$(ph copy)" "$(ph activate)")" "$(add "$(ph check)" "$(ph confirm)")")
    change_floor=$(add "$noop" "$one")

    buildfloor=$(build_floor "$built")
    copyfloor=$(copy_floor "$n" "$top")
    startfloor=$(start_floor "$n")
    d_start=$(add "$d_provision" "$d_activate")

    echo
    echo "== $n machines (2 cores: $(nproc); load before: $(cut -d' ' -f1-3 /proc/loadavg))"
    row "" flotilla floor ratio
    row "deploy from scratch" "${deploy}s" "" ""
    row "  build phase ($built derivations)" "${d_build}s" "${buildfloor}s" "$(ratio "$d_build" "$buildfloor")"
    row "  copy phase (cp -a into $n roots)" "${d_copy}s" "${copyfloor}s" "$(ratio "$d_copy" "$copyfloor")"
    row "  provision + activate (start)" "${d_start}s" "${startfloor}s" "$(ratio "$d_start" "$startfloor")"
    row "no-op redeploy (best of $RUNS) / eval" "${noop}s" "${evalfloor}s" "$(ratio "$noop" "$evalfloor")"
    row "one changed / no-op + its copy..confirm" "${change}s" "${change_floor}s" "$(ratio "$change" "$change_floor")"
    row "peak RSS, deploy: flotilla (with Nix)" "${deploy_hwm} MiB" "(${deploy_rss} MiB)" ""
    row "peak RSS, no-op: flotilla (with Nix)" "${noop_hwm} MiB" "(${noop_rss} MiB)" ""

    case $n in
        100) goal "100 machines from scratch in under 6 s (${deploy}s)" "$(lt "$deploy" 6 && echo yes)" ;;
        1000)
            goal "1,000 machines from scratch in under 60 s (${deploy}s)" "$(lt "$deploy" 60 && echo yes)"
            goal "1,000 machines: one change within 2x of no-op + its copy and activation ($(ratio "$change" "$change_floor"))" "$(lt "$change" "$(add "$change_floor" "$change_floor")" && echo yes)"
            goal "1,000 machines: deployer's peak memory under 300 MB (flotilla ${deploy_hwm} MiB, with Nix ${deploy_rss} MiB)" "$(lt "$(awk -v a="$deploy_rss" 'BEGIN { print a * 1.048576 }')" 300 && echo yes)"
            ;;
    esac
    case $n in 100 | 1000) goal "$n machines: no-op within 2x of evaluation ($(ratio "$noop" "$evalfloor"))" "$(lt "$noop" "$(add "$evalfloor" "$evalfloor")" && echo yes)" ;; esac

    fl destroy --yes >"$work/destroy-$n.log" 2>&1 || echo "(destroy of the $n machines exited $?; its output: $work/destroy-$n.log)" >&2
done

if [ ${#goals[@]} -gt 0 ]; then
    echo
    echo "== issue 20's goals in this run"
    printf '  %s\n' "${goals[@]}"
fi
