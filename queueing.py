"""Put events on the RQ queue. A job carries only the event key, never personal data."""

import hashlib
import logging
import secrets
import time

from redis import Redis
from rq import Callback, Queue

log = logging.getLogger(__name__)

HANDLER = "worker.handle_event"
FAILURE_CALLBACK = "worker.record_failure"


def _token_key(queue, token):
    # Keyed by a fingerprint of the token: a new IG_ACCESS_TOKEN starts clean.
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"{queue.name}:token-invalid:{fingerprint}"


def flag_token(queue, token, invalid):
    """Remember in Redis whether the Graph API last said this token is invalid."""
    if invalid:
        queue.connection.set(_token_key(queue, token), "1")
    else:
        queue.connection.delete(_token_key(queue, token))


def token_flagged(queue, token):
    """Tell whether the Graph API last said this token is invalid."""
    return bool(queue.connection.exists(_token_key(queue, token)))


# Sliding window: the times of the sends of the last second, in a sorted set.
# Take a slot if fewer than the limit remain; else say how long until one frees.
_TAKE_SEND_SLOT = """
local key, now, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local window = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, member)
  redis.call('EXPIRE', key, 5)
  return '0'
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
return tostring(tonumber(oldest) + window - now)
"""
#: A little over a second: a slot is taken a few milliseconds before Meta
#: sees the request, and those milliseconds vary from send to send.
SEND_WINDOW_SECONDS = 1.05


def wait_for_send_slot(connection, settings, clock=time.time, sleep=time.sleep):
    """Block until a send keeps the last second within SEND_RATE_PER_SECOND.

    Every worker counts in one Redis sorted set, so the whole service never
    sends more than the limit in any one-second window. Return the time the
    slot was taken (``clock()``), or None when there is no limit.
    """
    limit = settings.send_rate_per_second
    if not limit:
        return None
    take = connection.register_script(_TAKE_SEND_SLOT)
    key = f"{settings.queue_name}:sends"
    while True:
        now = clock()
        member = f"{now}:{secrets.token_hex(4)}"
        wait = float(take(keys=[key], args=[now, limit, member, SEND_WINDOW_SECONDS]))
        if wait <= 0:
            return now
        sleep(wait)


#: A relay that has events to queue says so in Redis for this long; /readyz
#: reports events that wait with no relay at work.
RELAY_HEARTBEAT_SECONDS = 15


def relay_heartbeat_key(settings):
    """Return the Redis key a relay at work keeps alive."""
    return f"{settings.queue_name}:relay-at-work"


def job_timeout(settings):
    """Seconds a job may run (RQ stops it then): two Graph calls, a long lock wait."""
    return int(2 * settings.graph_timeout_seconds + 30)


def lease_seconds(settings):
    """Seconds an attempt holds its event; past that, its worker is presumed dead."""
    return job_timeout(settings) + 10


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


def new_job_id(event_key):
    """Return a fresh job id that starts with the event key, so logs line up."""
    return f"{event_key}-{secrets.token_hex(4)}"


def enqueue_events(queue, keys_and_kinds, settings, job_ids=None):
    """Enqueue one job per (event key, kind) in one round trip.

    Return {event key: job id}. Every enqueue gets a job id of its own
    (new ones unless ``job_ids`` gives them): RQ overwrites a job whose id
    is reused, even one that is running.
    """
    job_ids = job_ids or {key: new_job_id(key) for key, _ in keys_and_kinds}
    jobs = [
        Queue.prepare_data(
            HANDLER,
            args=(key,),
            job_id=job_ids[key],
            description=f"{kind} event {key}",
            timeout=job_timeout(settings),
            on_failure=Callback(FAILURE_CALLBACK),
        )
        for key, kind in keys_and_kinds
    ]
    with queue.connection.pipeline() as pipe:
        queue.enqueue_many(jobs, pipeline=pipe)
        pipe.execute()
    return job_ids
