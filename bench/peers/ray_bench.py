"""Ray: ray.init(num_cpus=2), a no-op remote function."""
import common


def main():
    a = common.args(__doc__)
    import psutil
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def noop(_=None):
        return None

    ray.get([noop.remote() for _ in range(4)])
    rt = common.round_trips(lambda: ray.get(noop.remote()), a.roundtrips)

    def batch(n):
        ray.get([noop.remote(i) for i in range(n)])

    tp = common.throughput(batch, a.tasks, a.budget_s)
    pids = [p.pid for p in psutil.process_iter(["name"])
            if p.info["name"] in ("gcs_server", "raylet")]
    rss = common.rss_kib(pids)
    ray.shutdown()
    common.write(a.json, {
        "peer": "ray", "version": f"ray {ray.__version__}",
        "setup": "ray.init(num_cpus=2); ray.get(noop.remote())",
        "round_trip": rt, "throughput": tp,
        "rss_kib": rss, "rss_what": "gcs_server + raylet after the throughput run",
    })


if __name__ == "__main__":
    main()
