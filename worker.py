"""The RQ worker: decide what each event needs, send replies, keep what failed.

Run ``python worker.py`` (until SIGTERM) or ``python worker.py --burst``
(until the queue is empty). A job's only argument is the event key; the
event itself is read from SQLite.

Retry policy: a transient Graph error returns an RQ ``Retry`` with a delay
from RETRY_DELAYS (or longer, if Meta asked for it); a permanent one, or
the last failed retry, raises, and the failure callback writes the
event's single dead-letter row.
"""

import argparse
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError
from rq import Retry, SimpleWorker, get_current_job
from rq.exceptions import AbandonedJobError
from rq.registry import StartedJobRegistry
from rq.timeouts import JobTimeoutException, TimerDeathPenalty

import logs
import queueing
import reconciler
import rules
import settings as settings_module
import storage
from errors import ConfigError, EventFailed, GraphAPIError, ServiceError, StorageError
from events import COMMENT, MESSAGE, comment_fields, message_text, sender_id
from instagram_client import InstagramClient
from security import pseudonym, redact
from storage import Store, parse_iso

# Named, not __name__: run as a script this module is "__main__".
log = logging.getLogger("worker")

#: Meta refuses replies to a message older than this...
REPLY_WINDOW = timedelta(hours=24)
#: ...and private replies to a comment older than this.
PRIVATE_REPLY_WINDOW = timedelta(days=7)
#: No retry waits longer than this, unless Meta itself asks for longer.
MAX_RETRY_DELAY_SECONDS = 4 * 3600
#: RQ looks for abandoned jobs this often (its default is 10 minutes).
MAINTENANCE_INTERVAL_SECONDS = 60


@dataclass
class Context:
    """What one worker process needs for every job, whichever thread runs it."""

    settings: settings_module.Settings
    store: Store  # one SQLite connection per thread inside
    redis: object  # redis-py clients are safe to share between threads
    pid: int
    _clients: threading.local = field(default_factory=threading.local)

    @property
    def client(self):
        """Return this thread's Graph API client: it keeps per-call state."""
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = InstagramClient(self.settings)
        return client


_context = None
_context_lock = threading.Lock()


def context():
    """Return this process's Context, built from the settings on first use."""
    global _context
    with _context_lock:
        if _context is None or _context.pid != os.getpid():
            settings = settings_module.load()
            settings.require_worker_settings()
            _context = Context(
                settings,
                Store(settings.database_path, storage.WORKER_BUSY_TIMEOUT_SECONDS),
                queueing.connect(settings),
                os.getpid(),
            )
        return _context


# -- the job -----------------------------------------------------------------


def handle_event(event_key):
    """Handle one stored event: reply, ignore, retry later or fail for good."""
    ctx = context()
    try:
        event = ctx.store.start_attempt(event_key, queueing.lease_seconds(ctx.settings))
    except (sqlite3.Error, StorageError) as exc:
        # The attempt never started, and the database may not be able to
        # record anything now: nothing is written, RQ runs the job again.
        log.warning(
            "event %s: database unavailable (%s); trying again in %ds",
            event_key,
            exc,
            DATABASE_RETRY_SECONDS,
        )
        return _retry_without_record(event_key)
    if event is None:
        log.info(
            "event %s: nothing to do (already handled, or another worker has it)",
            event_key,
        )
        return None
    if event["reply_message_id"]:
        ctx.store.finish(event_key, "done", "already_replied")
        log.info("event %s: reply already recorded, nothing sent", event_key)
        return None

    return _reply_or_ignore(ctx, event)


def _reply_or_ignore(ctx, event):
    key = event["event_key"]
    decision = decide(event, ctx.settings, datetime.now(UTC))
    if decision.outcome:
        ctx.store.finish(key, "ignored", decision.outcome)
        log.info("event %s: ignored (%s)", key, decision.outcome)
        return None

    whom = pseudonym(
        decision.recipient_id or decision.comment_id, ctx.settings.app_secrets[0]
    )
    if decision.cooldown and not ctx.store.claim_cooldown(
        whom, key, ctx.settings.reply_cooldown_seconds
    ):
        ctx.store.finish(key, "ignored", "cooldown")
        log.info(
            "event %s: ignored (sender %s had a reply within the cooldown)", key, whom
        )
        return None

    try:
        _take_send_slot(ctx, key)
    except RedisError as exc:
        return _retry(
            ctx,
            key,
            event["attempts"],
            GraphAPIError(
                f"send rate limit unavailable: {type(exc).__name__}", transient=True
            ),
        )
    try:
        if decision.comment_id:
            message_id = ctx.client.send_private_reply(
                decision.comment_id, decision.text
            )
        else:
            message_id = ctx.client.send_text(decision.recipient_id, decision.text)
    except GraphAPIError as exc:
        if exc.maybe_sent:
            ctx.store.mark_send_uncertain(key)
            if not ctx.settings.retry_uncertain_sends:
                raise EventFailed(
                    "send_uncertain",
                    f"the reply may have gone out ({exc}); not sent again on its own",
                ) from None
        if exc.transient:
            return _retry(ctx, key, event["attempts"], exc)
        raise  # permanent: record_failure dead-letters it and frees the slot
    ctx.store.record_reply(key, message_id)
    log.info("event %s: replied to %s", key, whom)
    _token_works(ctx)
    return None


_token_cleared_at = float("-inf")
#: After a successful send, clear the invalid-token flag at most this often.
TOKEN_CLEAR_EVERY_SECONDS = 5.0


def _token_works(ctx):
    """The token works: /readyz stops reporting it as invalid within seconds."""
    global _token_cleared_at
    job = get_current_job()
    if job is None or time.monotonic() - _token_cleared_at < TOKEN_CLEAR_EVERY_SECONDS:
        return
    _token_cleared_at = time.monotonic()
    queue = queueing.get_queue(ctx.settings, job.connection)
    queueing.flag_token(queue, ctx.settings.access_token, False)


#: A send slot older than this when the request is about to leave is taken
#: again: the rate limit counts slots, Meta counts arrivals, and the window
#: (queueing.SEND_WINDOW_SECONDS) only allows for this much in between.
SLOT_FRESH_SECONDS = 0.02


#: The threads of a process wait for a send slot one at a time; the rest
#: sleep on this lock. When all polled Redis, a full window woke every
#: waiting thread at the same moment for one free slot, and the rate limit
#: cost a reply half as much CPU again as the reply itself.
_SLOT_TURN = threading.Lock()


def _take_send_slot(ctx, key):
    """Take a send slot, then record that the send is starting.

    The record comes second, so an attempt that dies waiting for a slot is
    not taken for one whose reply may have gone out. If that write waited
    on the database long enough to age the slot, another slot is taken.
    """
    while True:
        with _SLOT_TURN:
            taken = queueing.wait_for_send_slot(ctx.redis, ctx.settings)
        ctx.store.mark_send_started(key)
        if taken is None or time.time() - taken < SLOT_FRESH_SECONDS:
            return


@dataclass(frozen=True)
class Decision:
    """What to do with an event: an outcome to ignore it with, or a reply to send."""

    outcome: str | None = None
    recipient_id: str = ""
    comment_id: str = ""
    text: str = ""
    #: Default replies wait out REPLY_COOLDOWN_SECONDS; keyword replies never do.
    cooldown: bool = False


def decide(event, settings, now):
    """Decide what an event needs. Raise EventFailed when it can never be answered."""
    kind = event["kind"]
    if kind not in (MESSAGE, COMMENT):
        return Decision(outcome=f"no reply to {kind}")
    try:
        data = json.loads(event["payload"])
    except ValueError:
        return Decision(outcome="payload unreadable")
    occurred = parse_iso(event["occurred_at"])
    age = now - occurred if occurred is not None else timedelta(0)
    if kind == COMMENT:
        return _decide_comment(data, settings, age)

    recipient = sender_id(data)
    if not recipient:
        return Decision(outcome="no sender")
    if recipient == settings.account_id:
        return Decision(outcome="no reply to our own message")
    rule = rules.first_match(settings.reply_rules, "message", message_text(data))
    if rule is None and not settings.auto_reply_text:
        return Decision(outcome="no rule matched; default replies are off")
    if age > REPLY_WINDOW:
        raise EventFailed(
            "outside_window",
            "the message is older than 24 hours; Meta refuses replies to it",
        )
    if rule is not None:
        return Decision(recipient_id=recipient, text=rule.reply)
    return Decision(
        recipient_id=recipient, text=settings.auto_reply_text, cooldown=True
    )


def _decide_comment(data, settings, age):
    comment_id, author, text = comment_fields(data)
    if not comment_id:
        return Decision(outcome="comment without an id")
    if author and author == settings.account_id:
        return Decision(outcome="no reply to our own comment")
    rule = rules.first_match(settings.reply_rules, "comment", text)
    if rule is None:
        return Decision(outcome="no comment rule matched")
    if age > PRIVATE_REPLY_WINDOW:
        raise EventFailed(
            "outside_window",
            "the comment is older than 7 days; Meta refuses private replies to it",
        )
    return Decision(comment_id=comment_id, text=rule.reply)


# -- retries -----------------------------------------------------------------


def jitter(seconds):
    """Return a random extra wait of up to a tenth of ``seconds``."""
    return random.uniform(0, seconds / 10)


def retry_delay(attempt, delays, retry_after=None):
    """Return the wait before retry number ``attempt`` (1-based), in whole seconds.

    Uses RETRY_DELAYS with jitter and a cap, and never waits less than the
    server asked for.
    """
    base = delays[min(attempt, len(delays)) - 1]
    delay = min(base + jitter(base), MAX_RETRY_DELAY_SECONDS)
    if retry_after:
        delay = max(delay, retry_after)
    return math.ceil(delay)


def _retry(ctx, key, attempt, exc):
    """Schedule another attempt, or fail for good when RETRY_DELAYS is used up."""
    delays = ctx.settings.retry_delays
    if attempt > len(delays):
        raise EventFailed(
            "retries_exhausted", f"gave up after {attempt} attempts; last error: {exc}"
        )
    delay = retry_delay(attempt, delays, exc.retry_after)
    ctx.store.release(
        key, "retried", f"attempt {attempt} failed ({exc}); next in {delay}s", delay
    )
    log.warning(
        "event %s: attempt %d failed (%s); retrying in %ds", key, attempt, exc, delay
    )

    # Our attempt count lives with the event, so a replayed event starts
    # afresh; RQ's own counter only has to let this one retry through.
    job = get_current_job()
    done_before = (job.number_of_retries or 0) if job else 0
    # RQ rounds a due time down to the whole second; one more keeps the
    # wait at least `delay`, as a Retry-After demands.
    return Retry(max=done_before + 1, interval=[delay + 1 if delay else 0])


#: While the database cannot start an attempt, the job is tried this often...
DATABASE_RETRY_SECONDS = 10
#: ...this many times (an hour), then it fails and the reconciler keeps it.
DATABASE_RETRIES = 360


def _retry_without_record(key):
    job = get_current_job()
    done_before = (job.number_of_retries or 0) if job else 0
    if done_before >= DATABASE_RETRIES:
        raise StorageError(f"event {key}: the database stayed unavailable")
    return Retry(max=done_before + 1, interval=[DATABASE_RETRY_SECONDS])


# -- failures ----------------------------------------------------------------


def record_failure(job, connection, exc_type, exc, traceback):
    """RQ failure callback: write the event's one dead-letter row.

    Runs once per failed job: jobs carry no RQ retry policy of their own
    (retries are returned as ``Retry``), so every exception is final. RQ
    also calls it for a job whose worker died (AbandonedJobError): such an
    attempt is tried again while RETRY_DELAYS lasts.
    """
    global _token_cleared_at
    ctx = context()
    key = job.args[0] if job.args else None
    event = ctx.store.get_event(key) if isinstance(key, str) else None
    if event is None:
        log.warning("job %s failed for an event that is not stored", job.id)
        return
    if event["status"] in ("done", "ignored") or event["job_id"] not in (None, job.id):
        log.info("event %s: failure of superseded job %s ignored", key, job.id)
        return
    if isinstance(exc, AbandonedJobError):
        if not _lease_expired(event):
            return  # another attempt holds the event right now
        queue = queueing.get_queue(ctx.settings, connection)
        reconciler.requeue_or_bury(ctx.store, queue, ctx.settings, event, "abandoned")
        return

    if isinstance(exc, JobTimeoutException):
        reason = "timeout"
    elif isinstance(exc, ServiceError) and getattr(exc, "reason", None):
        reason = exc.reason
    else:
        reason = "internal_error"
    if event["send_started_at"] and not isinstance(exc, ServiceError):
        # A surprise between starting a send and hearing back: it may have gone.
        ctx.store.mark_send_uncertain(key)
    error = redact(
        f"{type(exc).__name__}: {exc}",
        (ctx.settings.access_token, *ctx.settings.app_secrets),
    )[:1000]
    ctx.store.dead_letter(key, reason, error, event["attempts"])

    # What rq-dashboard shows: the kind of event and why it failed.
    job.meta["reason"] = reason
    job.save_meta()
    job.description = f"{event['kind']} event {key}: {reason}"
    connection.hset(job.key, "description", job.description)
    if reason == "token_invalid":
        queue = queueing.get_queue(ctx.settings, connection)
        queueing.flag_token(queue, ctx.settings.access_token, True)
        # The next send that works clears the flag, however soon it comes.
        _token_cleared_at = float("-inf")
        log.error(
            "event %s: dead-lettered: the Graph API says IG_ACCESS_TOKEN is invalid or "
            "expired; set a new IG_ACCESS_TOKEN, restart the worker, then replay the "
            "token_invalid dead letters",
            key,
        )
    else:
        log.warning("event %s: dead-lettered (%s): %s", key, reason, error)


def _lease_expired(event):
    lease = parse_iso(event["lease_until"])
    return lease is None or lease < datetime.now(UTC)


# -- entry point -------------------------------------------------------------


#: Set once SIGTERM or SIGINT asked the worker to stop.
STOP = threading.Event()
RESTART_PAUSE_SECONDS = 5
#: An idle worker thread looks at STOP this often.
IDLE_CHECK_SECONDS = 1
#: Set by the process's relay while events arrive faster than
#: FLOOD_EVENTS_PER_SECOND: no thread takes a new job meanwhile, and each
#: looks again this often.
FLOODED = threading.Event()
FLOOD_CHECK_SECONDS = 0.2


def _install_stop_handlers():
    """SIGTERM or SIGINT: finish the jobs in hand, then stop; a second one: now."""

    def stop(signum, frame):
        if STOP.is_set():
            log.warning("stopping now, without waiting for the jobs in hand")
            # RQ's scheduler runs in a child process that exit would wait for.
            for child in multiprocessing.active_children():
                child.terminate()
            raise SystemExit(1)
        log.info("stopping once the jobs in hand are done")
        STOP.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


#: The lowest priority niceness gives; WORKER_NICE at it also means SCHED_IDLE.
MAX_NICE = 19


def _lower_priority(nice):
    """Run below the web: when both want the CPU, Meta is answered first.

    The queue then drains a little later, which costs nothing: the events
    are stored. At the lowest niceness, 19 (the default), Linux's idle
    scheduling class (SCHED_IDLE, sched(7)) is taken as well: the worker
    then runs only on CPU time no ordinary process wants, and a web
    process that wakes up takes the CPU back at once. Beside busy workers
    the web reached 0.43-0.48 of bench/ingest.py's ceiling with niceness
    19 alone and 0.47-0.58 in the idle class; even so the workers took a
    tenth of a core from it, hence the flood pause (see README,
    Performance).

    Where the kernel groups processes by session (autogroup, on by default
    in many distributions), priorities only order processes inside one
    session: launcher.py keeps web and workers in its own session for that
    reason. A worker that leads a session of its own lowers the session's
    group as well; never a session it shares.
    """
    if not nice:
        return
    os.nice(nice)
    if nice >= MAX_NICE and hasattr(os, "SCHED_IDLE"):
        try:  # before any thread starts: threads and forks inherit it
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.info("idle scheduling class unavailable (%s); niceness only", exc)
    if os.getsid(0) != os.getpid():
        return  # the session is not ours alone: lowering it would lower others
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(nice))
    except OSError:
        pass  # no autogroup here (or not ours to change): nice alone applies


def _wait_for_redis(connection, give_up):
    """Wait until Redis answers, saying so now and then; False on stop or give-up."""
    waited = 0
    while True:
        try:
            connection.ping()
            return True
        except RedisError as exc:
            if give_up or waited % 30 == 0:
                log.error(
                    "cannot reach Redis at REDIS_URL (%s)%s",
                    type(exc).__name__,
                    "" if give_up else "; waiting for it",
                )
            if give_up:
                return False
        if STOP.wait(2):
            return False
        waited += 2


def _new_worker(queue, connection):
    worker = EventWorker(
        [queue],
        connection=connection,
        maintenance_interval=MAINTENANCE_INTERVAL_SECONDS,
        log_job_description=True,
    )
    worker.log_result_lifespan = False
    return worker


# RQ's maintenance, run by these workers in threads, fails abandoned jobs
# through StartedJobRegistry and runs their failure callback (record_failure)
# under the registry's timeout, which defaults to SIGALRM: outside the main
# thread that raises, and the abandoned event would never be retried. RQ
# builds those registries itself, so their class takes the thread-safe timer.
StartedJobRegistry.death_penalty_class = TimerDeathPenalty


class EventWorker(SimpleWorker):
    """The RQ worker this service runs, one per thread (WORKER_THREADS).

    A SimpleWorker runs jobs in its own process instead of forking one per
    job: jobs are short HTTP calls, so a fork per job costs more than the
    job, and the HTTP session and SQLite connection are reused between jobs.

    Several of these run in each worker process, one per thread, and
    launcher.py starts several processes: WORKER_PROCESSES x WORKER_THREADS,
    3 x 4 by default. Measured with bench/drain.py on 2 cores, no send limit:

    - RQ spends about 2.4 ms of CPU and 50 Redis commands on every job, ours
      included or not; with ours a job costs about 4 ms. One process, held
      to one core by the GIL, works about 170 jobs a second, and more
      threads in it only fight over the GIL (Graph API at 0 ms: 1 thread
      174/s, 4 threads 168/s, 8 threads 149/s): throughput needs processes.
    - With the Graph API at 100 ms a thread sends about 9 replies a second,
      so 100 a second needs a dozen sends in flight: concurrency needs
      threads, which cost almost nothing, where a process costs about 50 MB.
    - 3 x 4 gave 314 events/s at 0 ms and 105 replies/s at 100 ms; 2 x 4
      gave 245/s and 70/s; 2 x 8 gave 218/s and 133/s. Three processes
      keep the whole deployment well under 500 MB.

    In a thread the job timeout comes from a timer (RQ's TimerDeathPenalty)
    instead of SIGALRM, and the process's main thread, not RQ, owns SIGTERM
    and SIGINT.
    """

    death_penalty_class = TimerDeathPenalty
    #: RQ refreshes a worker's key in Redis three times per job, three round
    #: trips each: more Redis traffic than the job itself. The key lives for
    #: minutes, so a refresh a second is plenty; RQ's refreshes that set a
    #: job's own deadline (in a pipeline) always go through.
    HEARTBEAT_EVERY_SECONDS = 1.0
    _beat_at = float("-inf")

    def heartbeat(self, timeout=None, pipeline=None):
        """Refresh the worker's key, at most once a second unless RQ needs more."""
        if timeout is None and pipeline is None:
            if time.monotonic() - self._beat_at < self.HEARTBEAT_EVERY_SECONDS:
                return
            self._beat_at = time.monotonic()
        super().heartbeat(timeout, pipeline)

    def _install_signal_handlers(self):
        """Leave signals to the main thread (_install_stop_handlers)."""

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """Wait for a job as RQ does, but look at STOP every second.

        RQ's wait only ends with a job or a signal to its own thread, and
        signals reach only the main thread. Returning None ends work().
        """
        if timeout is None or max_idle_time is not None:  # burst, or RQ's own limit
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not STOP.is_set():
            if FLOODED.is_set():  # the relay saw a flood: the web needs the CPU
                self.heartbeat()
                STOP.wait(FLOOD_CHECK_SECONDS)
                continue
            found = super().dequeue_job_and_maintain_ttl(
                IDLE_CHECK_SECONDS, IDLE_CHECK_SECONDS
            )
            if found is not None:
                return found
        return None

    def subscribe(self):
        """Listen for RQ's worker commands, checking five times a second.

        RQ's own listener may sleep up to 60 s before it notices it is
        subscribed, and a stopping worker waits for it: every stop, burst
        run and test would then take a minute.
        """
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=0.2,
            daemon=True,
            exception_handler=self._pubsub_exception_handler,
        )

    def request_stop(self, signum, frame):
        """RQ's shutdown command: the whole process finishes its jobs and stops."""
        STOP.set()

    def execute_job(self, job, queue):
        """Run the job, letting the main thread know a job is in hand."""
        _BUSY.add(threading.get_ident())
        try:
            super().execute_job(job, queue)
        finally:
            _BUSY.discard(threading.get_ident())

    def handle_exception(self, job, *exc_info):
        """Leave expected failures to record_failure's one line: no traceback."""
        if isinstance(exc_info[1], ServiceError):
            self.log.debug("job %s failed: %s", job.id, type(exc_info[1]).__name__)
            return
        super().handle_exception(job, *exc_info)


def _work(queue, connection, log_level, with_scheduler):
    """Run one worker until STOP, starting it again if its loop ends early."""
    while not STOP.is_set():
        worker = _new_worker(queue, connection)
        try:
            worker.work(with_scheduler=with_scheduler, logging_level=log_level)
        except RedisError as exc:
            log.error("lost Redis: %s", type(exc).__name__)
        if STOP.is_set():
            break
        # RQ leaves its loop when Redis goes away in the middle of a job.
        log.error(
            "worker loop ended unexpectedly; starting again in %ds",
            RESTART_PAUSE_SECONDS,
        )
        STOP.wait(RESTART_PAUSE_SECONDS)


def main(argv=None):
    """Run the worker until SIGTERM, or until the queue is empty with --burst."""
    parser = argparse.ArgumentParser(description="Work the queue of Instagram events.")
    parser.add_argument(
        "--burst", action="store_true", help="work until the queue is empty, then exit"
    )
    args = parser.parse_args(argv)

    try:
        ctx = context()
        logs.configure(ctx.settings.log_level, ctx.settings.log_format)
        ctx.store.init_schema()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2
    _install_stop_handlers()
    _lower_priority(ctx.settings.worker_nice)
    connection = queueing.connect(ctx.settings)
    if not _wait_for_redis(connection, give_up=args.burst):
        return 1

    queue = queueing.get_queue(ctx.settings, connection)
    level = ctx.settings.log_level

    if args.burst:
        # One pass first, so events stored but not yet queued are worked too.
        reconciler.run_pass(ctx.store, queue, ctx.settings, relay_all=True)
        _new_worker(queue, connection).work(burst=True, logging_level=level)
        return 0

    helpers = [
        reconciler.Relay(ctx.store, queue, ctx.settings, flooded=FLOODED),
        reconciler.Reconciler(ctx.store, queue, ctx.settings),
    ]
    threads = [
        # The first worker also runs RQ's scheduler, which starts due retries.
        threading.Thread(
            target=_work,
            args=(queue, connection, level, index == 0),
            name=f"rq-worker-{index + 1}",
            daemon=True,
        )
        for index in range(ctx.settings.worker_threads)
    ]
    log.info(
        "worker started: %d threads on queue %s", len(threads), ctx.settings.queue_name
    )
    ctx.store.start_checkpoints()
    for thread in helpers + threads:
        thread.start()
    try:
        while not STOP.wait(1):
            pass
        _finish(threads)
    finally:
        for helper in helpers:
            helper.stop()
    log.info("worker stopped")
    return 0


#: Threads running a job right now (their idents).
_BUSY = set()
#: Once no job is in hand, threads get this long to sign off from Redis.
SIGN_OFF_SECONDS = 3.0


def _finish(threads):
    """Wait for the jobs in hand, then for the idle threads to sign off.

    An idle thread notices STOP within a second, unless Redis is away: then
    it sits in RQ's own wait for Redis (pauses of up to a minute) and is
    left behind, with no job to lose.
    """
    idle_since = None
    while any(thread.is_alive() for thread in threads):
        if _BUSY:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > SIGN_OFF_SECONDS:
            log.warning(
                "stopping without waiting for %d idle threads (Redis unreachable?)",
                sum(thread.is_alive() for thread in threads),
            )
            return
        time.sleep(0.1)


if __name__ == "__main__":
    # Jobs name their functions "worker.*"; make this module that one, so
    # RQ does not import a second copy of it.
    sys.modules.setdefault("worker", sys.modules[__name__])
    sys.exit(main())
