#!/usr/bin/env bash
# Adds Debian 12's backports suite to apt's sources, from the mirror the host's own sources
# already use (the first `deb.debian`-style main archive entry found), so nothing names a
# mirror host. Does nothing when a source for bookworm-backports exists. Run as root.
set -euo pipefail

# Only files apt reads (not *.save or *.disabled), and not a deb822 stanza switched off.
shopt -s nullglob
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    if awk '/^[[:space:]]*$/ { if (b && on) hit = 1; b = 0; on = 1 }
            /^[[:space:]]*Enabled:[[:space:]]*no/ { on = 0 }
            /^[^#]*bookworm-backports/ { b = 1 }
            END { if (b && on) hit = 1; exit !hit }' on=1 "$f"; then
        exit 0
    fi
done
# The main archive's URI: deb822 `.sources` files (Debian 12's default) or one-line lists.
uri=$(awk '
    /^URIs:/ { u = $2 }
    /^Suites:/ && u != "" { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print u; exit } }
    /^$/ { u = "" }
' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" { for (i = 2; i < NF; i++) if ($i ~ /^[a-z]+:\/\// && $(i + 1) == "bookworm") { print $i; exit } }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
fi
if [ -z "$uri" ]; then
    echo "apt-backports: no bookworm source found in /etc/apt/sources.list*; add bookworm-backports by hand" >&2
    exit 2
fi
cat >/etc/apt/sources.list.d/flotilla-backports.sources <<SOURCES
# Written by flotilla's scripts/apt-backports.sh: the host's own mirror, backports suite.
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
echo "apt-backports: added bookworm-backports from $uri" >&2
