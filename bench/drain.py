"""Drain benchmark: replies per second when a queue of direct messages is worked.

Run from the project folder:

    .venv/bin/python bench/drain.py                       # about 2 minutes
    .venv/bin/python bench/drain.py --latencies 100 --limits 100

For each --latencies value (milliseconds the stand-in Graph API waits
before answering each call; 0 and 100 by default) and each --limits value
(SEND_RATE_PER_SECOND: 100, the default, then 0, no limit, which shows
what the worker itself can do):

1. start a redis-server with the launcher's own flags and ``python
   launcher.py web``, with no worker, and post --messages direct messages
   (default 2,000, from as many senders, --per-delivery to a delivery)
   through the web, so they are stored as in production, then queue their
   jobs with the relay's own code (reconciler.relay_received), as a
   worker's relay would;
2. start the default worker setup, ``python launcher.py worker`` (what
   ./run.sh starts beside the web), and wait until every event is done,
   ignored or dead, or --timeout seconds have passed;
3. print replies per second (first to last send, and over the whole drain
   from the worker's start), the time to drain, the most sends the stand-in
   saw in any one second (a sliding window), the CPU used by the worker's
   processes, Redis and the stand-in (which runs in this script's process),
   whether anyone got two replies, and the deployment's memory at the end.

The targets are judged on the rate once the workers are up: from the first
send to the end of the drain. The worker processes' start (about 0.7 s on
2 cores, mostly Python importing RQ, redis-py and requests) happens once,
not per event; the verdict also gives the rate counting it.

A drain cut short by --timeout is reported with the replies it sent and
the time the whole queue would take at that rate. Everything listens on
127.0.0.1, on free ports, in a temporary folder.
"""

import shutil
import sys
import tempfile
import time

import common
from redis import Redis

import queueing
import reconciler
import settings
import storage

#: Issue 7's targets: events per second at 0 ms and replies per second at
#: 100 ms Graph latency, which only a drain without a send limit can show
#: (every message here needs a reply)...
TARGETS = {0: 300, 100: 100}
#: ...and the send rate that must never be exceeded, by default.
SEND_RATE_LIMIT = settings.Settings.send_rate_per_second


def parse_args(argv):
    parser = common.parser(__doc__)
    parser.add_argument(
        "--latencies",
        default="0,100",
        help="comma-separated Graph API latencies in ms, one drain each (0,100)",
    )
    parser.add_argument(
        "--limits",
        default=f"{SEND_RATE_LIMIT},0",
        help="comma-separated SEND_RATE_PER_SECOND values, one drain each "
        f"({SEND_RATE_LIMIT},0; 0 is no limit)",
    )
    parser.add_argument(
        "--messages", type=int, default=2000, help="direct messages queued (2000)"
    )
    parser.add_argument(
        "--per-delivery",
        type=int,
        default=100,
        help="messages per delivery posted to fill the queue (100)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a drain may take before it is cut short (60)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        latencies = [int(v) for v in args.latencies.split(",") if v.strip()]
    except ValueError:
        print("error: --latencies: expected whole milliseconds", file=sys.stderr)
        return 2
    try:
        limits = [int(v) for v in args.limits.split(",") if v.strip()]
    except ValueError:
        print("error: --limits: expected whole sends per second", file=sys.stderr)
        return 2

    folder = tempfile.mkdtemp(prefix="bench-drain-")
    print(common.machine_line())
    print(
        f"{args.messages} direct messages queued (worker stopped), then "
        "`launcher.py worker` started; default worker settings"
    )
    outcomes = []
    try:
        for limit in limits:
            for latency in latencies:
                outcome = drain(
                    args, latency, limit, f"{folder}/limit-{limit}-latency-{latency}"
                )
                outcomes.append(outcome)
                print(
                    f"  {_limit_text(limit)}, {latency} ms: {outcome['final']}/"
                    f"{args.messages} final in {outcome['drain_s']:.1f} s"
                )
    finally:
        if args.keep:
            print(f"logs and databases kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    report(args, outcomes)
    return 0


def drain(args, latency, limit, folder):
    """Fill the queue, start the worker, wait; return the figures of one drain."""
    service = {**settings_of(args), "SEND_RATE_PER_SECOND": str(limit)}
    with (
        common.GraphStandIn(latency / 1000) as graph,
        common.Deployment(folder, graph.url, **service) as deployment,
    ):
        deployment.start_redis()
        deployment.launch("web")
        fill(args, deployment)
        redis = Redis(port=deployment.redis_port)
        queued = redis.llen(f"rq:queue:{settings.Settings.queue_name}")

        started = time.monotonic()
        deployment.launch("worker")
        pids = deployment.settled_pids(seconds=0.3, limit=5)
        worker_pids = [pid for label, pid in pids.items() if label.startswith("work")]
        cpu_before = sum(common.cpu_seconds(pid) for pid in worker_pids)
        redis_before = common.cpu_seconds(pids["redis"])
        stand_in_before = time.process_time()
        drained = common.wait_until(
            lambda: _final(deployment) >= args.messages,
            max(0.0, started + args.timeout - time.monotonic()),
            interval=0.1,
        )
        ended = time.monotonic()
        cpu = sum(common.cpu_seconds(pid) for pid in worker_pids) - cpu_before
        redis_cpu = common.cpu_seconds(pids["redis"]) - redis_before
        stand_in_cpu = time.process_time() - stand_in_before
        memory = common.memory_rows(deployment.pids())[-1]
        times, recipients = graph.snapshot()
        statuses = deployment.statuses()
    return {
        "latency": latency,
        "limit": limit,
        "queued": queued,
        "drained": bool(drained),
        "final": sum(statuses.get(s, 0) for s in common.FINAL),
        "statuses": statuses,
        "drain_s": ended - started,
        "sends": len(times),
        "first_send_s": times[0] - started if times else None,
        "send_span_s": times[-1] - times[0] if len(times) > 1 else 0.0,
        "max_per_second": common.max_in_window(times, 1.0),
        "twice": sum(1 for n in recipients.values() if n > 1),
        "worker_cores": cpu / (ended - started),
        "redis_cores": redis_cpu / (ended - started),
        "stand_in_cores": stand_in_cpu / (ended - started),
        "rss_mb": memory[2],
        "pss_mb": memory[3],
    }


def fill(args, deployment):
    """Post the messages through the web, queue them; check they are all queued."""
    for raw, _ in common.direct_messages(args.messages, "drain", args.per_delivery):
        status, _, _ = common.post(deployment.web_port, raw)
        if status != 200:
            raise SystemExit(f"error: filling the queue: HTTP {status}")
    service = settings.from_env(deployment.env)
    queue = queueing.get_queue(service, Redis(port=deployment.redis_port))
    reconciler.relay_received(storage.Store(deployment.db_path), queue, service)
    statuses = deployment.statuses()
    if statuses.get("queued") != args.messages:
        raise SystemExit(f"error: expected {args.messages} queued events, {statuses}")


def _final(deployment):
    statuses = deployment.statuses()
    return sum(statuses.get(s, 0) for s in common.FINAL)


def report(args, outcomes):
    rows = []
    for o in outcomes:
        span_rate = (o["sends"] - 1) / o["send_span_s"] if o["send_span_s"] else 0.0
        whole_rate = o["sends"] / o["drain_s"]
        drain_time = f"{o['drain_s']:.1f}"
        if not o["drained"]:
            projected = args.messages / whole_rate if whole_rate else float("inf")
            drain_time = f"> {o['drain_s']:.0f} (cut; ~{projected:.0f} at this rate)"
        rows.append(
            [
                _limit_text(o["limit"]),
                o["latency"],
                o["queued"],
                o["sends"],
                f"{span_rate:.1f}",
                f"{whole_rate:.1f}",
                drain_time,
                f"{o['first_send_s']:.2f}" if o["first_send_s"] is not None else "-",
                o["max_per_second"],
                o["twice"],
                f"{o['worker_cores']:.2f} / {o['redis_cores']:.2f} / "
                f"{o['stand_in_cores']:.2f}",
                f"{o['rss_mb']} / {o['pss_mb']}",
            ]
        )
    print()
    print(
        common.table(
            [
                "send limit",
                "Graph latency ms",
                "queued",
                "replies",
                "replies/s (1st-last send)",
                "replies/s (whole drain)",
                "time to drain s",
                "1st send after s",
                "max sends in 1 s",
                "replied twice",
                "cores: worker / redis / stand-in",
                "RSS / PSS MB at end",
            ],
            rows,
        )
    )
    print()
    for o in outcomes:
        text = ", ".join(f"{k} {v}" for k, v in sorted(o["statuses"].items()))
        print(
            f"{_limit_text(o['limit'])}, {o['latency']} ms: event statuses at "
            f"the end: {text}"
        )
    print()
    print(
        "issue 7 targets (rates from the first send, when the worker processes"
        " have started, to the end of the drain):"
    )
    for o in outcomes:
        print(f"  {_limit_text(o['limit'])}, {o['latency']} ms: {_verdict(o)}")


def _limit_text(limit):
    return f"{limit}/s" if limit else "none"


def _verdict(o):
    """Say which of the issue's targets this drain shows, and whether it meets them."""
    twice = f"replied twice: {o['twice']} ({'met' if not o['twice'] else 'NOT met'})"
    if o["limit"]:
        within = o["max_per_second"] <= o["limit"]
        rate = o["sends"] / o["drain_s"]
        return (
            f"most sends in any 1 s {o['max_per_second']} (never above "
            f"{o['limit']}: {'met' if within else 'NOT met'}); {rate:.1f} replies/s, "
            f"{rate / o['limit']:.0%} of the limit; {twice}"
        )
    target = TARGETS.get(o["latency"])
    done, what = (
        (o["final"], "events/s") if o["latency"] == 0 else (o["sends"], "replies/s")
    )
    started = o["first_send_s"] or 0.0
    rate = done / max(o["drain_s"] - started, 1e-9)
    verdict = (
        f"at least {target}: {'met' if rate >= target else 'NOT met'}"
        if target
        else "no target at this latency"
    )
    return (
        f"{rate:.1f} {what} ({verdict}); {done / o['drain_s']:.1f}/s counting the"
        f" {started:.2f} s the worker processes took to start; {twice}"
    )


def settings_of(args):
    return common.settings_from(args.settings)


if __name__ == "__main__":
    sys.exit(main())
