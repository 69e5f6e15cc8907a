"""Celery with a Redis broker and result backend; a prefork worker with 2 processes."""
import os
import signal
import subprocess
import sys
import time

import common


def main():
    a = common.args(__doc__)
    import celery
    import redis as redis_py
    from celery import group

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from celery_tasks import app, noop

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--concurrency=2",
         "--pool=prefork", "-Q", "bench", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-l", "warning"],
        cwd=here, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                noop.delay().get(timeout=2)
                break
            except Exception:
                if time.time() > deadline:
                    raise
        rt = common.round_trips(lambda: noop.delay().get(timeout=30), a.roundtrips)

        def batch(n):
            res = group(noop.s(i) for i in range(n)).apply_async()
            res.get(timeout=600)
            res.forget()

        tp = common.throughput(batch, a.tasks, a.budget_s)
        r = redis_py.Redis.from_url(os.environ["CELERY_BENCH_REDIS"])
        redis_pid = int(r.info("server")["process_id"])
        rss = common.rss_kib([redis_pid])
        common.write(a.json, {
            "peer": "celery", "version": f"celery {celery.__version__}, redis-py {redis_py.__version__}, "
                                           f"redis-server {r.info('server')['redis_version']}",
            "setup": "Redis broker + result backend (AOF, appendfsync everysec); worker --pool=prefork --concurrency=2; noop.delay().get()",
            "round_trip": rt, "throughput": tp,
            "rss_kib": rss, "rss_what": "redis-server after the throughput run",
        })
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
