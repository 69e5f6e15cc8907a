"""Dask `distributed`: LocalCluster with a scheduler and 2 worker processes, 1 thread each."""
import time

import common


def noop(_=None):
    return None


def main():
    a = common.args(__doc__)
    import dask
    import distributed
    from distributed import Client, LocalCluster, wait

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        rt = common.round_trips(lambda: client.submit(noop, pure=False).result(), a.roundtrips)

        def batch(n):
            futures = client.map(noop, range(n), pure=False)
            wait(futures)
            assert all(f.status == "finished" for f in futures)
            del futures

        tp = common.throughput(batch, a.tasks, a.budget_s)
        time.sleep(1)
        sched_pid = client.run_on_scheduler(lambda: __import__("os").getpid())
        rss = common.rss_kib([sched_pid])
        common.write(a.json, {
            "peer": "dask", "version": f"distributed {distributed.__version__}, dask {dask.__version__}",
            "setup": "LocalCluster: scheduler + 2 worker processes x 1 thread; client.submit(noop).result()",
            "round_trip": rt, "throughput": tp,
            "rss_kib": rss, "rss_what": "scheduler process after the throughput run",
        })


if __name__ == "__main__":
    main()
