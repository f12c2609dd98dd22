#!/usr/bin/env python3
"""Runs `flotilla ... --json` for the benchmarks and says where its time went.

    phases.py EVENTS -- CMD...

Runs CMD (normally /usr/bin/time -v ... nsenter ... flotilla deploy --json), writes each
line of its stdout to EVENTS with the seconds since the start in front, and watches the
`flotilla` process among CMD's descendants for its peak resident set (VmHWM: the deployer's
own, without the Nix processes it runs, which /usr/bin/time counts too). Then prints one
line of `key=value` figures for bash:

    exit wall hwm_kib built phase_<name>...

phase_<name> is the wall time during which some machine was in the phase (the union of each
machine's time from entering it to being done with it): where the deploy's time went. `built` counts
the derivations Nix built (its `building '...drv'` lines, forwarded as nix-log events).
A benchmark helper, not part of flotilla: it never fails on a slow machine, only on a
command that failed.
"""

import json
import os
import subprocess
import sys
import threading
import time


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def find_flotilla(root):
    """The first descendant of root (or root) named flotilla."""
    todo = [root]
    while todo:
        pid = todo.pop()
        if comm(pid) == "flotilla":
            return pid
        todo.extend(children(pid))
    return None


def main():
    out, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--" and cmd, __doc__
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    peak = [0]

    def watch():
        pid = None
        while proc.poll() is None:
            if pid is None:
                pid = find_flotilla(proc.pid)
            if pid is not None:
                h = hwm_kib(pid)
                if h is not None:
                    peak[0] = max(peak[0], h)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    events = []
    with open(out, "w") as f:
        for raw in proc.stdout:
            t = time.monotonic() - start
            line = raw.decode(errors="replace").rstrip("\n")
            f.write(f"{t:.3f} {line}\n")
            events.append((t, line))
    code = proc.wait()
    wall = time.monotonic() - start
    watcher.join()

    # Each machine's interval in each phase (from the phase starting for it, or it entering
    # the phase, to it being done with it); a phase's time is the union of its intervals: the
    # wall time during which some machine was in it. Phases overlap (one machine copies while
    # another activates), so they do not add up to the wall time.
    opened, spans, built = {}, {}, 0
    for t, line in events:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        kind, phase = e.get("event"), e.get("phase")
        if kind == "nix-log" and e.get("line", "").startswith("building '"):
            built += 1
        elif kind == "phase-started":
            for m in e.get("machines") or ["*"]:
                opened.setdefault((m, phase), t)
        elif kind == "machine-phase":
            opened.setdefault((e["machine"], phase), t)
        elif kind == "machine-done":
            began = opened.pop((e["machine"], phase), opened.get(("*", phase), t))
            spans.setdefault(phase, []).append((began, t))
    busy = {}
    for phase, intervals in spans.items():
        total, end = 0.0, None
        for a, b in sorted(intervals):
            if end is None or a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        busy[phase] = total
    figures = [f"exit={code}", f"wall={wall:.3f}", f"hwm_kib={peak[0]}", f"built={built}"]
    figures += [f"phase_{p}={busy[p]:.3f}" for p in busy]
    print(" ".join(figures))


if __name__ == "__main__":
    main()
