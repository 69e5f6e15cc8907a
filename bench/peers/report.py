"""Builds the docs/BENCHMARKS.md section of bench/run.sh from the JSON results of the
Paddock bench (crates/paddock/benches/dispatch.rs) and of the peers (bench/peers/*_bench.py)."""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def f(v, nd=2):
    if v is None:
        return "n/a"
    if isinstance(v, (int,)) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def mib(kib):
    return None if kib is None else kib / 1024


def main():
    out_dir, meta_path = sys.argv[1], sys.argv[2]
    meta = load(meta_path)
    pad = load(os.path.join(out_dir, "paddock.json")) or {}
    peers = {}
    for name in ("dask", "ray", "celery"):
        peers[name] = load(os.path.join(out_dir, f"{name}.json"))
    floor = pad.get("floor") or {}
    dbs = {d["db"]: d for d in pad.get("paddock", [])}

    L = []
    L.append("")
    L.append(f"## Dispatch: no-op round trip, throughput and idle agents, next to Dask, Ray and Celery ({meta['date']})")
    L.append("")
    L.append(f"Machine: {meta['machine']}. Load average (1 min) at start {meta['load_start']}, "
             f"before the peers {meta['load_mid']}, at the end {meta['load_end']}.")
    L.append(f"Command: `{meta['command']}` (release build; {meta['elapsed']} s in all).")
    L.append("")
    L.append("| contender | round trip p50 ms | p99 ms | tasks/s | tasks in the run | RSS MiB | versions, set-up |")
    L.append("|---|---:|---:|---:|---:|---:|---|")
    if floor:
        L.append(f"| raw WebSocket floor | {f(floor['p50_ms'], 3)} | {f(floor['p99_ms'], 3)} | | | | "
                 f"tokio-tungstenite, 2 processes, {floor['request_bytes']} B out / {floor['reply_bytes']} B back |")
    for db, d in dbs.items():
        idle = d.get("idle_rss", {})
        idle_txt = "; ".join(
            f"{int(k):,} idle: {mib(v['rss_kib'] if isinstance(v, dict) else v):.0f}"
            for k, v in idle.items())
        rows = [
            ("agent.noop, 1 agent", d.get("round_trip", {}), d.get("throughput_1"), True),
            ("agent.noop, 1 agent, round trips sent through `reqwest` (a connection task: one more hand-off "
             "each way in the client)", d.get("round_trip_reqwest", {}), None, False),
            ("agent.noop, 2 agents", {}, d.get("throughput_2"), False),
            ("agent.noop, 1 agent with 64 slots, submitted with `POST /tasks/batch` (500 per request)", {},
             d.get("throughput_batch"), False),
            ("argv `true` on the host backend, 1 agent", d.get("round_trip_true", {}),
             d.get("throughput_1_true"), False),
        ]
        for what, rt, t, with_idle in rows:
            if not rt and not t:
                continue
            rss = f"{mib(t['rss_kib_after']):.0f} after the run" if t and t.get("rss_kib_after") else ""
            if with_idle and idle_txt:
                rss = f"{rss}; {idle_txt}" if rss else idle_txt
            L.append(f"| paddock {db}, {what} | {f(rt.get('p50_ms')) if rt else ''} | "
                     f"{f(rt.get('p99_ms')) if rt else ''} | "
                     f"{f(t['tasks_per_s']) if t else 'n/a'} | {f(t['tasks']) if t else ''} | {rss} | "
                     f"{meta['paddock_version']} |")
    for name, p in peers.items():
        if not p:
            L.append(f"| {name} | n/a | n/a | n/a | | | did not run: {meta['peer_status'].get(name, 'failed')} |")
            continue
        tp = p["throughput"]
        L.append(f"| {name} | {f(p['round_trip']['p50_ms'])} | {f(p['round_trip']['p99_ms'])} | "
                 f"{f(tp['tasks_per_s'])} | {f(tp['tasks'])}{'' if tp['tasks'] == tp['wanted'] else ' (budget)'} | "
                 f"{mib(p['rss_kib']):.0f} ({p['rss_what']}) | {p['version']}; {p['setup']} |")

    # Ratios and targets, against Paddock on SQLite (the default).
    sq = dbs.get("sqlite", {})
    p50 = sq.get("round_trip", {}).get("p50_ms")
    tput_rows = {"throughput_1": "1 agent, one POST per task", "throughput_2": "2 agents, one POST per task",
                 "throughput_batch": "1 agent with 64 slots, batched submissions"}
    tps_single = max([sq.get(k, {}).get("tasks_per_s", 0) for k in ("throughput_1", "throughput_2")] or [0]) or None
    best_key = max(tput_rows, key=lambda k: sq.get(k, {}).get("tasks_per_s", 0))
    tps = sq.get(best_key, {}).get("tasks_per_s") or None
    ran = {n: p for n, p in peers.items() if p}
    L.append("")
    L.append("Ratios, Paddock on SQLite with `agent.noop` (the counterpart of the peers' no-op function) over "
             "each peer (p50: the peer's p50 divided by Paddock's, higher is better for Paddock; throughput: "
             f"Paddock's best row ({tput_rows[best_key]}) divided by the peer's; in brackets the best row "
             "with one POST per task):")
    L.append("")
    L.append("| peer | p50 peer/paddock | tasks/s paddock/peer |")
    L.append("|---|---:|---:|")
    for n, p in ran.items():
        r1 = p["round_trip"]["p50_ms"] / p50 if p50 else None
        r2 = tps / p["throughput"]["tasks_per_s"] if tps else None
        r3 = tps_single / p["throughput"]["tasks_per_s"] if tps_single else None
        L.append(f"| {n} | {f(r1)}x | {f(r2)}x ({f(r3)}x) |")
    L.append("")
    best_p50 = min((p["round_trip"]["p50_ms"] for p in ran.values()), default=None)
    best_tps = max((p["throughput"]["tasks_per_s"] for p in ran.values()), default=None)
    idle10k = sq.get("idle_rss", {}).get("10000")
    idle10k_pg = dbs.get("postgres", {}).get("idle_rss", {}).get("10000")
    L.append("| target (issue 6) | measured in this run | status |")
    L.append("|---|---|---|")
    if p50 and floor:
        r = p50 / floor["p50_ms"]
        L.append(f"| round-trip p50 within 2x of the raw WebSocket floor | {f(p50)} ms vs {f(floor['p50_ms'], 3)} ms = {f(r, 1)}x | "
                 f"{'met' if r <= 2 else f'**missed** by {f(r / 2, 1)}x'} |")
    if p50 and best_p50:
        r = best_p50 / p50
        L.append(f"| round-trip p50 at least 5x lower than the best peer | best peer {f(best_p50)} ms vs {f(p50)} ms = {f(r, 1)}x lower | "
                 f"{'met' if r >= 5 else f'**missed** (need 5x)'} |")
    if tps and best_tps:
        r = tps / best_tps
        r_single = tps_single / best_tps if tps_single else 0
        L.append(f"| throughput at least 3x the best peer, durable state (SQLite) | {f(tps)} ({tput_rows[best_key]}) vs {f(best_tps)} tasks/s = {f(r, 1)}x; one POST per task: {f(tps_single)} = {f(r_single, 1)}x | "
                 f"{'met' if r >= 3 else f'**missed** (need 3x)'} |")
    if idle10k:
        m = mib(idle10k["rss_kib"])
        pgm = f", PostgreSQL {mib(idle10k_pg['rss_kib']):.0f} MiB" if idle10k_pg else ""
        L.append(f"| 10,000 idle agents under 1 GiB gateway RSS | SQLite {m:.0f} MiB{pgm} ({idle10k['live']:,} sessions live) | "
                 f"{'met' if m < 1024 and (not idle10k_pg or mib(idle10k_pg['rss_kib']) < 1024) else '**missed**'} |")
    print("\n".join(L))


if __name__ == "__main__":
    main()
