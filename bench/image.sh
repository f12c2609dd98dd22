#!/usr/bin/env bash
# Benchmark (not a test): `flotilla image --format oci` (issue 16).
#
# For two machines, the example's kind of web server (busybox, a page) and one whose closure
# also holds about BIG_MB MiB of real files (copy.sh's big closure: /usr/lib, one store path),
# times side by side, on the same store paths:
#   image      `flotilla image MACHINE --format oci -o DIR` into a fresh layout (the machine
#              layer already built: the figure is the layering, tars, hashing and writing)
#   tar floor  `tar -c` of the image's closure paths into a pipe to /dev/null (through `cat`:
#              GNU tar reads nothing when its archive is /dev/null itself)
#   tar+sha    `tar -c` of the same paths through `tee FILE | sha256sum`: the same work as the
#              image's layers (a tar, its digest, its bytes on disk) in one stream
#   rebuild    the machine's /etc/motd changed, `flotilla image` into the same layout again:
#              only the machine layer (which holds the toplevel) is written, the others are
#              known from the layout's index (the Nix build of the new toplevel and machine
#              layer included, as a user sees it)
# and prints each time with its ratio to the floor. Each image and tar figure is the best of
# $RUNS runs. Then the push, once each, every figure into a fresh Debian `docker-registry`
# started by the bench on 127.0.0.1 in the bench's own network namespace (storage in $work):
#   push       `flotilla image MACHINE --format oci -o DIR --push REF` of the built layout
#              (its layers known from the index: the figure is the evaluation and the push)
#   skopeo     the peer: `skopeo copy --preserve-digests oci:DIR docker://REF` of the same
#              layout (the same bytes up, uncompressed), and `skopeo copy` as it is by default
#              (it gzips uncompressed layers on the way)
#   re-push    /etc/motd changed, `flotilla image --push` to the registry holding the first
#              push: what is uploaded (one layer and the config) and how long it takes
#
#   bash bench/image.sh              # the web server and a 1 GiB machine
#   BIG_MB=200 bash bench/image.sh   # a smaller big closure
set -euo pipefail
cd "$(dirname "$0")/.."

BIG_MB=${BIG_MB:-1024}
RUNS=${RUNS:-3}

. bench/lib.sh
trap bench_cleanup EXIT
bench_setup image
FLOTILLA_STATE=$work/state.db

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo "== preparing the big closure (${BIG_MB} MiB of /usr/lib)" >&2
big=$(big_path "$BIG_MB" "$work/stage")

# The deployment: `web` as the example's web servers, `big` the same with the big path.
deployment() { # motd
    cat <<EOF
{ meta.name = "benchimage";
  defaults = { pkgs, ... }: { packages = [ pkgs.busybox ]; binsh = "\${pkgs.busybox}/bin/sh"; files."/etc/motd".text = "$1"; };
  machines = let web = extra: { name, pkgs, ... }: {
    users.www = { home = "/var/empty"; };
    services.httpd = { user = "www"; command = [ "\${pkgs.busybox}/bin/httpd" "-f" "-p" "80" "-h" "\${pkgs.writeTextDir "index.html" "<h1>Hello from \${name}</h1>"}" ]; };
  } // extra pkgs; in {
    web = web (pkgs: { });
    big = web (pkgs: { packages = [ pkgs.busybox (pkgs.runCommand "usr-lib-sample-link" { } "ln -s \${builtins.storePath "$big"} \$out") ]; });
  };
}
EOF
}
file=$work/deployment.nix
deployment "one" >"$file"

# A fresh docker-registry on 127.0.0.1 inside the bench's namespace, storage under $work.
in_ns() { nsenter --net="/run/netns/$ns" -- "$@"; }
reg="" reg_pid=""
registry_start() {
    local port dir
    port=$(in_ns python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    dir=$(mktemp -d "$work/registry.XXXXXX")
    printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$dir/data" "$port" >"$dir/config.yml"
    in_ns docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
    reg_pid=$! reg=127.0.0.1:$port
    for _ in $(seq 200); do in_ns bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && return 0; sleep 0.05; done
    echo "docker-registry did not start: $(cat "$dir/log")" >&2; exit 1
}
registry_stop() { [ -z "$reg_pid" ] || { kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true; reg_pid=""; }; }
trap 'registry_stop; bench_cleanup' EXIT

size_of() { echo "$1" | xargs nix-store -q --size | awk '{ s += $1 } END { printf "%.1f MiB", s / 1048576 }'; }

for m in web big; do
    echo "== $m" >&2
    # The first build makes the machine layer with Nix (not timed) and tells the closure.
    report=$(fl image -f "$file" "$m" --format oci -o "$work/$m-first" --json) || { cat "$file" >&2; exit 1; }
    field() { python3 -c 'import json,sys; r=json.load(sys.stdin); r=r[0] if isinstance(r, list) else r; print(eval(sys.argv[1], {}, {"r": r}))' "$1"; }
    toplevel=$(echo "$report" | field 'r["toplevel"]')
    layers=$(echo "$report" | field 'r["layers"]')
    # The image's store paths: the toplevel's closure and the agent's (the entrypoint).
    agent=$(echo "$report" | field 'r["entrypoint"][0].rsplit("/bin/", 1)[0]')
    paths=$(nix-store -qR "$toplevel" "$agent" | sort -u)
    n=$(echo "$paths" | wc -l)
    one_image() { rm -rf "$work/$m-oci"; fl image -f "$file" "$m" --format oci -o "$work/$m-oci"; }
    tar_floor() { echo "$paths" | tar -c -T - -f - 2>/dev/null | cat >/dev/null; }
    tar_sha() { echo "$paths" | tar -c -T - -f - 2>/dev/null | tee "$work/tar.out" | sha256sum >/dev/null; rm -f "$work/tar.out"; }
    t_image=$(best_of "$RUNS" one_image)
    t_floor=$(best_of "$RUNS" tar_floor)
    t_sha=$(best_of "$RUNS" tar_sha)
    deployment "two" >"$file"
    t0=$(now); re=$(fl image -f "$file" "$m" --format oci -o "$work/$m-oci" --json); t1=$(now)
    t_re=$(secs "$t0" "$t1")
    written=$(echo "$re" | field 'r["layersWritten"]')
    deployment "one" >"$file"

    # The push: the layout built from "one" again, pushed to fresh registries.
    fl image -f "$file" "$m" --format oci -o "$work/$m-oci" >/dev/null 2>&1
    tag=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$work/$m-oci/index.json")
    registry_start; t0=$(now); fl image -f "$file" "$m" --format oci -o "$work/$m-oci" --push "docker://$reg/$m:one" >/dev/null 2>&1; t1=$(now)
    t_push=$(secs "$t0" "$t1")
    deployment "two" >"$file"
    t0=$(now); rep=$(fl image -f "$file" "$m" --format oci -o "$work/$m-oci" --json --push "docker://$reg/$m:two" 2>/dev/null); t1=$(now)
    t_repush=$(secs "$t0" "$t1")
    up=$(echo "$rep" | field 'str(len(r["push"]["uploaded"])) + " blobs (" + str(sum(1 for b in r["push"]["uploaded"] if ".layer." in b["media_type"])) + " layer), %.1f MiB" % (r["push"]["bytes_uploaded"] / 1048576)')
    deployment "one" >"$file"
    fl image -f "$file" "$m" --format oci -o "$work/$m-oci" >/dev/null 2>&1
    registry_stop
    registry_start; t0=$(now); in_ns skopeo copy -q --preserve-digests --dest-tls-verify=false "oci:$work/$m-oci:$tag" "docker://$reg/$m:one" >/dev/null; t1=$(now)
    t_skopeo=$(secs "$t0" "$t1"); registry_stop
    registry_start; t0=$(now); in_ns skopeo copy -q --dest-tls-verify=false "oci:$work/$m-oci:$tag" "docker://$reg/$m:one" >/dev/null; t1=$(now)
    t_skopeo_gz=$(secs "$t0" "$t1"); registry_stop

    echo "$m: $n store paths, $(size_of "$paths"), $layers layers"
    echo "  image      ${t_image} s  ($(ratio "$t_image" "$t_floor")x the tar floor, $(ratio "$t_image" "$t_sha")x tar+sha)"
    echo "  tar floor  ${t_floor} s"
    echo "  tar+sha    ${t_sha} s"
    echo "  rebuild    ${t_re} s  after /etc/motd changed: ${written} of ${layers} layers written"
    echo "  push       ${t_push} s  ($(ratio "$t_push" "$t_skopeo")x skopeo copy --preserve-digests, $(ratio "$t_push" "$t_skopeo_gz")x skopeo copy)"
    echo "  skopeo     ${t_skopeo} s  --preserve-digests (uncompressed); ${t_skopeo_gz} s by default (gzip)"
    echo "  re-push    ${t_repush} s  after /etc/motd changed (rebuild included): ${up} uploaded"
done
