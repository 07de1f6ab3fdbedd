"""Batch benchmark: time to answer one signed delivery of 1,000 message events.

Run from the project folder:

    .venv/bin/python bench/batch.py                  # about 15 seconds
    .venv/bin/python bench/batch.py --repeat 20 --events 1000

Posts --repeat deliveries, one after another, each a single entry holding
--events direct messages from as many senders (Meta sends up to 1,000 updates
in one POST), and prints the time from the request's start to the last byte
of the answer: min, median and max. It checks after each one that all its
events were stored. Two setups, unless --setups picks one:

- all: ``python launcher.py`` as ./run.sh runs it, its worker replying to
  the previous batches through a stand-in Graph API while the next comes in;
- web: ``python launcher.py web`` beside a redis-server started with the
  launcher's own flags, with no worker competing.

Everything listens on 127.0.0.1, on free ports, in a temporary folder.
"""

import json
import shutil
import statistics
import sys
import tempfile
import time

import common

#: Issue 7's target: a delivery of 1,000 events answered in under a second.
TARGET_SECONDS = 1.0
SETUPS = {
    "all": "service + worker (launcher.py)",
    "web": "service, web only (no worker)",
}


def parse_args(argv):
    parser = common.parser(__doc__)
    parser.add_argument(
        "--events", type=int, default=1000, help="events per delivery (1000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="deliveries posted per setup (5)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds between deliveries (1), so the worker gets to work",
    )
    parser.add_argument(
        "--setups",
        default="all,web",
        help="comma-separated setups: all (with the worker), web (without)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not setups or set(setups) - set(SETUPS):
        print(f"error: --setups: expected some of {', '.join(SETUPS)}", file=sys.stderr)
        return 2

    folder = tempfile.mkdtemp(prefix="bench-batch-")
    print(common.machine_line())
    print(
        f"{args.repeat} deliveries of {args.events} message events each "
        f"({args.pause:g} s apart), one entry, one sender per message"
    )
    rows, verdicts = [], []
    try:
        with common.GraphStandIn() as graph:
            for setup in setups:
                times, problems, body_kb = measure(args, setup, folder, graph)
                rows.append(
                    [
                        SETUPS[setup],
                        f"{body_kb:.0f}",
                        f"{min(times) * 1000:.0f}",
                        f"{statistics.median(times) * 1000:.0f}",
                        f"{max(times) * 1000:.0f}",
                        "yes" if not problems else "; ".join(problems),
                    ]
                )
                verdicts.append(
                    f"  {SETUPS[setup]}: max {max(times):.2f} s (< "
                    f"{TARGET_SECONDS:g} s: "
                    f"{'met' if max(times) < TARGET_SECONDS else 'NOT met'}), "
                    f"median {statistics.median(times):.2f} s"
                )
    finally:
        if args.keep:
            print(f"logs and databases kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print(
        common.table(
            [
                "setup",
                "body kB",
                "min ms",
                "median ms",
                "max ms",
                f"all {args.events} stored",
            ],
            rows,
        )
    )
    print()
    print("issue 7 target (1,000 events answered in under 1 s):")
    print("\n".join(verdicts))
    return 0


def measure(args, setup, folder, graph):
    """Post the deliveries to one setup; return (seconds each, problems, kB)."""
    times, problems, size = [], [], 0
    with common.Deployment(
        f"{folder}/{setup}", graph.url, **settings_of(args)
    ) as deployment:
        if setup == "web":
            deployment.start_redis()
        deployment.launch(setup)
        for i in range(args.repeat):
            raw, mids = next(
                common.direct_messages(args.events, f"b{setup}{i}", args.events)
            )
            size = len(raw) / 1024
            status, answer, seconds = common.post(deployment.web_port, raw)
            times.append(seconds)
            if status != 200:
                problems.append(f"delivery {i + 1}: HTTP {status}")
                continue
            stored = set(deployment.event_keys())
            missing = sum(common.message_key(mid) not in stored for mid in mids)
            new = json.loads(answer).get("new")
            if missing or new != args.events:
                problems.append(
                    f"delivery {i + 1}: {missing} not stored, answer says new={new}"
                )
            time.sleep(args.pause)
    return times, problems, size


def settings_of(args):
    return common.settings_from(args.settings)


if __name__ == "__main__":
    sys.exit(main())
