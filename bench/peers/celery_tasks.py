"""The Celery app of the benchmark: Redis broker and result backend from CELERY_BENCH_REDIS."""
import os

from celery import Celery

url = os.environ["CELERY_BENCH_REDIS"]
app = Celery("celery_tasks", broker=url, backend=url)
app.conf.update(
    task_default_queue="bench",
    worker_prefetch_multiplier=4,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


@app.task
def noop(_=None):
    return None
