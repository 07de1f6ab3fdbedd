"""Memory benchmark: resident memory of the default deployment, idle and after a drain.

Run from the project folder:

    .venv/bin/python bench/memory.py                 # about 20 seconds
    .venv/bin/python bench/memory.py --messages 5000

Starts ``python launcher.py`` as ./run.sh does (gunicorn master and workers,
the RQ worker and its children, its own redis-server), waits --idle seconds
and reads each process's RSS (/proc/PID/status) and PSS
(/proc/PID/smaps_rollup, which counts a page shared by N processes as 1/N
in each: the fair total). Then posts --messages direct messages (from as
many senders, 100 to a delivery), waits until the worker has replied to
all of them through a stand-in Graph API with no latency, and reads them
again. Prints one row per process and the totals. Everything listens on
127.0.0.1, on free ports, in a temporary folder.
"""

import shutil
import sys
import tempfile
import time

import common

#: Issue 7's target: the whole default deployment under 500 MB resident at idle.
TARGET_MB = 500


def parse_args(argv):
    parser = common.parser(__doc__)
    parser.add_argument(
        "--idle", type=float, default=3.0, help="seconds idle before reading (3)"
    )
    parser.add_argument(
        "--messages", type=int, default=2000, help="direct messages drained (2000)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds the drain may take (120)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench-memory-")
    print(common.machine_line())
    try:
        with (
            common.GraphStandIn() as graph,
            common.Deployment(folder, graph.url, **settings_of(args)) as deployment,
        ):
            deployment.launch("all")
            time.sleep(args.idle)
            pids = deployment.settled_pids()
            idle = common.memory_rows(pids)

            started = time.monotonic()
            for raw, _ in common.direct_messages(args.messages, "memory"):
                status, _, _ = common.post(deployment.web_port, raw)
                if status != 200:
                    raise SystemExit(f"error: posting messages: HTTP {status}")
            drained = common.wait_until(
                lambda: _final(deployment) >= args.messages, args.timeout, 0.2
            )
            seconds = time.monotonic() - started
            after = common.memory_rows(deployment.pids())
            replies = len(graph.snapshot()[0])
    finally:
        if args.keep:
            print(f"logs and databases kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print(
        f"after the drain: {args.messages} messages posted, {replies} replies, "
        f"{'drained' if drained else 'NOT drained'} in {seconds:.1f} s"
    )
    print()
    after_by_label = {row[0]: row for row in after}
    rows = []
    for label, pid, rss, pss in idle:
        later = after_by_label.pop(label, [label, pid, "-", "-"])
        rows.append([label, pid, rss, pss, later[2], later[3]])
    for label, pid, rss, pss in after_by_label.values():
        rows.append([label, pid, "-", "-", rss, pss])
    print(
        common.table(
            [
                "process",
                "pid",
                "idle RSS MB",
                "idle PSS MB",
                "after drain RSS MB",
                "after drain PSS MB",
            ],
            rows,
        )
    )
    total_rss = float(idle[-1][2])
    print()
    print(
        f"issue 7 target (whole deployment under {TARGET_MB} MB resident at idle): "
        f"RSS total {total_rss:.0f} MB, PSS total {idle[-1][3]} MB: "
        f"{'met' if total_rss < TARGET_MB else 'NOT met'}"
    )
    return 0


def _final(deployment):
    statuses = deployment.statuses()
    return sum(statuses.get(s, 0) for s in common.FINAL)


def settings_of(args):
    return common.settings_from(args.settings)


if __name__ == "__main__":
    sys.exit(main())
