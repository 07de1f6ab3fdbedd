"""Keep SQLite and the queue in step, so no stored event is ever lost.

SQLite is the record of truth; Redis only carries work. The web stores
events in the inbox and answers Meta; it never talks to Redis. Each worker
process runs:

- a relay (Relay), ten times a second: it moves the events stored since
  its last look from the inbox into the main database, marks them 'queued'
  with fresh job ids, then enqueues their jobs in one round trip, while the
  queue holds fewer than QUEUE_AHEAD jobs. Moving the enqueue here took a
  Redis round trip and most of RQ's own work off every delivery, and it
  batches: under load a look finds hundreds of events, queued together.
  It also counts the events arriving, and pauses the process's workers
  while more than FLOOD_EVENTS_PER_SECOND arrive in a second;
- a reconciler (Reconciler), every few seconds, one process at a time
  under a Redis lock, whose pass
- also relays, for a worker run with --burst;
- retries attempts whose worker died (their lease ran out);
- re-enqueues queued events whose job vanished (Redis restarted without its
  data, a failed job expired before anyone copied it);
- copies into dead_letter every job in RQ's failed registry whose failure
  was never recorded, and clears failed jobs a later attempt superseded.
"""

import collections
import logging
import sqlite3
import threading
import time

from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

import queueing

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 5
#: The relay looks for new events this often: the most an event waits
#: between its delivery's answer and its job. A look is one indexed query.
RELAY_INTERVAL_SECONDS = 0.1
BATCH = 500
#: The relay keeps at most about this many jobs on the queue (several relays
#: looking together may each add a batch). The rest of a backlog waits in
#: SQLite, where it costs nothing: a flood of deliveries is not turned into
#: Redis jobs while the web still needs the CPU, and Redis holds a bounded
#: amount of work. At 100 replies a second this is five seconds of work.
QUEUE_AHEAD = 500
#: Arrival rates are measured over this long (see Relay.watch_arrivals).
FLOOD_WINDOW_SECONDS = 1.0
LIVE_STATUSES = {
    JobStatus.QUEUED,
    JobStatus.SCHEDULED,
    JobStatus.STARTED,
    JobStatus.DEFERRED,
    JobStatus.CREATED,
}


def run_pass(store, queue, settings, relay_all=False):
    """Run one reconciliation pass; return what it did, by kind.

    It relays what the queue has room for, or every waiting event with
    ``relay_all`` (worker --burst).
    """
    return {
        "relayed": relay_received(
            store, queue, settings, None if relay_all else queue_room(queue)
        ),
        "abandoned": retry_abandoned(store, queue, settings),
        "stalled": requeue_stalled(store, queue, settings),
        "failed": sync_failed_jobs(store, queue, settings),
    }


def queue_room(queue, waiting=None):
    """Return how many more jobs the relay may put on the queue now.

    ``waiting``: the queue's length, when the caller has just read it.
    """
    return max(0, QUEUE_AHEAD - (queue.count if waiting is None else waiting))


def relay_received(store, queue, settings, most=None):
    """Queue events stored but not queued yet, up to ``most``; return how many.

    Events move from the inbox first (Store.move_inbox). SQLite comes
    before Redis: the events are marked 'queued' with their job ids, then
    the jobs are enqueued, so a job never runs before its event knows it.
    Relays of several worker processes never take the same event. If Redis
    refuses the jobs, the events go back to 'received' for the next look.
    """
    total = 0
    while most is None or total < most:
        want = BATCH if most is None else min(BATCH, most - total)
        store.move_inbox(want)
        taken = store.take_for_queue(want, "by the relay")
        if taken:
            job_ids = {key: job_id for key, _, job_id in taken}
            try:
                queueing.enqueue_events(
                    queue, [(key, kind) for key, kind, _ in taken], settings, job_ids
                )
            except RedisError:
                store.unqueue(list(job_ids))
                raise
            log.debug("relay: queued %d events", len(taken))
        total += len(taken)
        if len(taken) < want:
            break
    return total


def retry_abandoned(store, queue, settings):
    """Give events whose attempt outlived its lease another attempt, or end them."""
    events = store.abandoned_events(BATCH)
    for event in events:
        requeue_or_bury(store, queue, settings, event, "abandoned")
    return len(events)


def requeue_or_bury(store, queue, settings, event, why):
    """Enqueue a new job for an event whose attempt died, or dead-letter it."""
    key = event["event_key"]
    if event["send_started_at"] and not event["reply_message_id"]:
        store.mark_send_uncertain(key)  # it died waiting for Meta's answer
        if not settings.retry_uncertain_sends:
            store.dead_letter(
                key, "send_uncertain", f"attempt {why} during a send", event["attempts"]
            )
            return
    if event["attempts"] > len(settings.retry_delays):
        store.dead_letter(
            key,
            "retries_exhausted",
            f"gave up after {event['attempts']} attempts ({why})",
            event["attempts"],
        )
        log.warning("event %s: %s after its last attempt; dead-lettered", key, why)
        return
    detail = f"attempt {event['attempts']} died with its worker"
    job_id = requeue(store, queue, settings, event, why, detail)
    log.warning("event %s: %s; requeued as job %s", key, detail, job_id)


def requeue(store, queue, settings, event, action, detail):
    """Give an event a new job: recorded in SQLite first, then put on the queue.

    In this order a job never runs before its event knows it; if Redis
    fails in between, the stalled-event pass enqueues it later.
    """
    key = event["event_key"]
    job_id = queueing.new_job_id(key)
    store.requeued(key, job_id, action, detail)
    queueing.enqueue_events(queue, [(key, event["kind"])], settings, {key: job_id})
    return job_id


def requeue_stalled(store, queue, settings):
    """Re-enqueue queued events whose job is gone or over without telling us.

    A stalled event whose job failed unrecorded is dead-lettered instead:
    this catches failures older than the newest ones sync_failed_jobs reads.
    """
    count = 0
    for event in store.stalled_events(settings.queued_stale_seconds, BATCH):
        status = _job_status(queue, event["job_id"])
        if status in LIVE_STATUSES:
            continue  # still on its way
        if status == JobStatus.FAILED:
            job = Job.fetch(event["job_id"], connection=queue.connection)
            bury_failed_job(store, queue, settings, job, event)
        else:
            detail = f"job {event['job_id']} was {status or 'gone'}"
            job_id = requeue(store, queue, settings, event, "requeued", detail)
            log.warning(
                "event %s: %s; requeued as %s", event["event_key"], detail, job_id
            )
        count += 1
    return count


def sync_failed_jobs(store, queue, settings):
    """Make every job in RQ's failed registry appear in dead_letter exactly once.

    Reads the newest BATCH failures each pass: the registry keeps failures
    for a year, and older unrecorded ones are caught by requeue_stalled.
    """
    registry = FailedJobRegistry(queue=queue)
    count = 0
    newest = queue.connection.zrevrange(registry.key, 0, BATCH - 1)
    for job_id in (raw.decode() for raw in newest):
        try:
            job = Job.fetch(job_id, connection=queue.connection)
        except NoSuchJobError:
            continue
        key = job.args[0] if job.args else None
        event = store.get_event(key) if isinstance(key, str) else None
        if event is None:
            continue
        if event["job_id"] != job.id or event["status"] in ("done", "ignored"):
            # A later job carries the event now: this failure is history.
            registry.remove(job, delete_job=True)
            store.audit(key, "failed_job_cleared", f"job {job.id} was superseded")
            count += 1
        elif event["status"] != "dead":
            bury_failed_job(store, queue, settings, job, event)
            count += 1
    return count


def bury_failed_job(store, queue, settings, job, event):
    """Copy a failure RQ recorded but we did not into dead_letter.

    A job that failed before its attempt started (its worker was killed
    after taking it off the queue) never tried the event: the event gets a
    new job instead, up to len(RETRY_DELAYS) times.
    """
    key = event["event_key"]
    reason = job.meta.get("reason") or _reason_from(job)
    if event["attempts"] == 0 and store.audit_count(key, "requeued_unstarted") < len(
        settings.retry_delays
    ):
        detail = f"job {job.id} ended before its attempt started ({reason})"
        job_id = requeue(store, queue, settings, event, "requeued_unstarted", detail)
        log.warning("event %s: %s; requeued as %s", key, detail, job_id)
        return
    if event["send_started_at"]:
        store.mark_send_uncertain(key)
    store.dead_letter(
        key, reason, "the job failed without recording why", event["attempts"]
    )
    log.warning(
        "event %s: job %s failed unrecorded; dead-lettered (%s)", key, job.id, reason
    )


def _reason_from(job):
    result = job.latest_result()
    text = (result.exc_string or "") if result else ""
    if "AbandonedJobError" in text:
        return "abandoned"
    if "JobTimeoutException" in text:
        return "timeout"
    return "internal_error"


def _job_status(queue, job_id):
    if not job_id:
        return None
    try:
        return Job.fetch(job_id, connection=queue.connection).get_status()
    except NoSuchJobError:
        return None


class Reconciler(threading.Thread):
    """Run a pass every INTERVAL_SECONDS in the background; one process at a time."""

    def __init__(self, store, queue, settings, interval=INTERVAL_SECONDS):
        super().__init__(name="reconciler", daemon=True)
        self.store, self.queue, self.settings = store, queue, settings
        self.interval = interval
        self.stopped = threading.Event()
        self.lock_key = f"{settings.queue_name}:reconciler"

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                if self.queue.connection.set(
                    self.lock_key, "1", nx=True, ex=self.interval * 3
                ):
                    try:
                        run_pass(self.store, self.queue, self.settings)
                    finally:
                        self.queue.connection.delete(self.lock_key)
            except RedisError as exc:
                log.warning(
                    "reconciler: Redis unavailable (%s); trying again",
                    type(exc).__name__,
                )
            except Exception:
                log.exception("reconciler: pass failed; trying again")

    def stop(self):
        self.stopped.set()


class Relay(threading.Thread):
    """Queue newly stored events every RELAY_INTERVAL_SECONDS.

    While Redis is away it only asks it for the queue's length, so no event
    is marked and unmarked over and over; the events wait, stored, until
    Redis is back.

    It also watches how fast events arrive, and sets ``flooded`` while they
    come faster than FLOOD_EVENTS_PER_SECOND over the last FLOOD_WINDOW_SECONDS:
    the process's workers then take no new jobs (worker.EventWorker).
    """

    def __init__(
        self,
        store,
        queue,
        settings,
        interval=RELAY_INTERVAL_SECONDS,
        flooded=None,
        clock=time.monotonic,
    ):
        super().__init__(name="relay", daemon=True)
        self.store, self.queue, self.settings = store, queue, settings
        self.interval = interval
        self.stopped = threading.Event()
        self.redis_down = False
        self.flooded = flooded if flooded is not None else threading.Event()
        self._clock = clock
        self._arrivals = collections.deque()  # (time, newest inbox id)

    def run(self):
        while not self.stopped.wait(self.interval):
            self.look()

    def look(self):
        """Queue what is waiting, if Redis answers; return how many.

        An idle look only reads: no write lock taken from the web, no ping.
        """
        self.watch_arrivals()
        try:
            if not self.store.anything_to_queue():
                return 0
            room = self._room_and_heartbeat()
            relayed = relay_received(self.store, self.queue, self.settings, room)
        except RedisError as exc:
            if not self.redis_down:
                log.warning(
                    "relay: Redis unavailable (%s); stored events wait for it",
                    type(exc).__name__,
                )
            self.redis_down = True
            return 0
        except sqlite3.Error as exc:
            log.warning("relay: database busy (%s); trying again", exc)
            return 0
        except Exception:
            log.exception("relay: look failed; trying again")
            return 0
        if self.redis_down:
            log.info("relay: Redis is back; queueing stored events")
            self.redis_down = False
        return relayed

    def watch_arrivals(self):
        """Set or clear ``flooded`` by how fast events arrive; return the rate.

        A flood is a rate no reply limit keeps up with (Meta allows 100 text
        messages a second): replies fall behind however hard the workers
        work, while every core they take is one the web needs to answer
        Meta. Even in the idle scheduling class they took a tenth of the
        CPU from the web in bench/ingest.py; paused, none.
        """
        limit = self.settings.flood_events_per_second
        if not limit:
            return None
        try:
            newest = self.store.newest_inbox_id()
        except Exception as exc:  # a look that fails never leaves workers paused
            if self.flooded.is_set():
                log.warning(
                    "relay: cannot count arriving events (%s); workers take jobs again",
                    type(exc).__name__,
                )
                self.flooded.clear()
            self._arrivals.clear()
            return None
        now = self._clock()
        arrivals = self._arrivals
        arrivals.append((now, newest))
        # Keep the last look at or before the window's start, however old:
        # looks slowed down (a busy machine, Redis timing out) still count.
        while len(arrivals) > 2 and now - arrivals[1][0] >= FLOOD_WINDOW_SECONDS:
            arrivals.popleft()
        since, first = arrivals[0]
        if now - since < FLOOD_WINDOW_SECONDS / 2:
            return None  # too short a look back to tell
        # A replaced inbox starts its ids again: that is no arrival.
        rate = max(0, newest - first) / (now - since)
        if rate > limit and not self.flooded.is_set():
            log.info(
                "events arriving at %d/s, above FLOOD_EVENTS_PER_SECOND=%d:"
                " workers take no new jobs until it eases",
                rate,
                limit,
            )
            self.flooded.set()
        elif rate <= limit and self.flooded.is_set():
            log.info("events arriving at %d/s: workers take jobs again", rate)
            self.flooded.clear()
        return rate

    def _room_and_heartbeat(self):
        """Return the queue's room, and tell /readyz a relay is at work.

        One round trip, which also finds out whether Redis answers.
        """
        pipe = self.queue.connection.pipeline(transaction=False)
        pipe.llen(self.queue.key)
        pipe.set(
            queueing.relay_heartbeat_key(self.settings),
            "1",
            ex=queueing.RELAY_HEARTBEAT_SECONDS,
        )
        waiting, _ = pipe.execute()
        return queue_room(self.queue, waiting)

    def stop(self):
        self.stopped.set()
