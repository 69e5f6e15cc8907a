#!/usr/bin/env python3
"""Where a no-op round trip's time goes: pairs the socket syscalls of the bench client, the
gateway and the agent from `perf script` output (see bench/segments.sh) and prints the p50 of
each segment, with the WAL writes (`pwrite64`) the gateway makes in each of its two halves.

Usage: segments.py PERF_SCRIPT_TEXT CLIENT_PID GATEWAY_PID AGENT_PID
"""
import re
import statistics
import sys

LINE = re.compile(r"^\s*\S+\s+(\d+)/(\d+)\s+\[\d+\]\s+([\d.]+):\s+syscalls:(sys_\w+):\s*(.*)$")
SEND = {"sys_enter_sendto", "sys_enter_writev", "sys_enter_write", "sys_enter_sendmsg"}
RECV = {"sys_exit_recvfrom", "sys_exit_read", "sys_exit_readv", "sys_exit_recvmsg"}
SEGMENTS = [
    "client -> gateway",
    "gateway: request read -> dispatch written",
    "gateway -> agent",
    "agent: dispatch read -> result written",
    "agent -> gateway",
    "gateway: result read -> response written",
    "gateway -> client",
]
# The step each event may fill, in order: (pid role, kind).
STEPS = [("g", "recv"), ("g", "send"), ("a", "recv"), ("a", "send"), ("g", "recv"), ("g", "send"),
         ("c", "recv")]


def main():
    path, cpid, gpid, apid = sys.argv[1], *sys.argv[2:5]
    role = {cpid: "c", gpid: "g", apid: "a"}
    trips, cur, writes = [], None, None
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        pid, _tid, ts, ev, rest = m.groups()
        r = role.get(pid)
        if r is None:
            continue
        t = float(ts) * 1e6
        if ev == "sys_enter_pwrite64":
            if cur is not None and r == "g":
                writes[0 if len(cur) < 3 else 1] += 1
            continue
        if ev in SEND:
            kind = "send"
        elif ev in RECV:
            ret = re.search(r"0x([0-9a-f]+)$", rest)
            if not ret or int(ret.group(1), 16) == 0 or int(ret.group(1), 16) > 1 << 40:
                continue  # nothing read (EAGAIN shows as a huge unsigned value)
            kind = "recv"
        else:
            continue
        if r == "c" and kind == "send":
            cur, writes = [t], [0, 0]
            continue
        if cur is None:
            continue
        want = STEPS[len(cur) - 1]
        if (r, kind) == want:
            cur.append(t)
            if len(cur) == 8:
                trips.append((cur, writes))
                cur = None
    if not trips:
        sys.exit("no complete round trip found")
    print(f"{len(trips)} round trips; p50 of each segment (µs):")
    print()
    print("| segment | p50 µs |")
    print("|---|---:|")
    for i, name in enumerate(SEGMENTS):
        p50 = statistics.median(tr[i + 1] - tr[i] for tr, _ in trips)
        print(f"| {name} | {p50:.0f} |")
    total = statistics.median(tr[7] - tr[0] for tr, _ in trips)
    print(f"| whole round trip (client send -> client receive) | {total:.0f} |")
    w1 = statistics.median(w[0] for _, w in trips)
    w2 = statistics.median(w[1] for _, w in trips)
    print()
    print(f"`pwrite64` calls by the gateway per round trip (p50): {w1:.0f} in the request half, "
          f"{w2:.0f} in the result half (a WAL frame is two).")


if __name__ == "__main__":
    main()
