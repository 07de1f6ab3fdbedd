"""Put events on the RQ queue. A job carries only the event key, never personal data."""

import logging

from redis import Redis
from rq import Callback, Queue

log = logging.getLogger(__name__)

HANDLER = "worker.handle_event"
FAILURE_CALLBACK = "worker.record_failure"


def job_timeout(settings):
    """Seconds a job may run: a few Graph calls' worth, never less than 30."""
    return int(max(30, 3 * settings.graph_timeout_seconds + 10))


def connect(settings):
    """Return a Redis client for REDIS_URL that fails fast when Redis is away."""
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
    )


def get_queue(settings, connection=None):
    """Return the queue events travel on."""
    return Queue(settings.queue_name, connection=connection or connect(settings))


def enqueue_events(queue, keys_and_kinds, settings):
    """Enqueue one job per (event key, kind) in one round trip; job id = key."""
    jobs = [
        Queue.prepare_data(
            HANDLER,
            args=(key,),
            job_id=key,
            description=f"{kind} event {key}",
            timeout=job_timeout(settings),
            on_failure=Callback(FAILURE_CALLBACK),
        )
        for key, kind in keys_and_kinds
    ]
    with queue.connection.pipeline() as pipe:
        queue.enqueue_many(jobs, pipeline=pipe)
        pipe.execute()
