"""Ingest benchmark: signed deliveries per second, beside the web stack's ceiling.

Run from the project folder:

    .venv/bin/python bench/ingest.py                 # about 2.5 minutes
    .venv/bin/python bench/ingest.py --duration 30   # longer runs

Four kinds of run, one after another, each loaded for --duration seconds (after
--warmup seconds whose figures are dropped) at --connections concurrent
connections, every request a unique, correctly signed delivery of one
direct message:

1. generator: the load generator against a trivial server that answers 200
   at almost no cost: the generator's own ceiling on this machine;
2. ceiling: bench/ceiling_app.py, a Flask route that only answers 200, on
   gunicorn with the project's gunicorn.conf.py (same workers, same
   settings): the web stack's ceiling;
3. service, web only: ``python launcher.py web`` beside a redis-server
   started with the launcher's own flags: what the web does for every
   delivery (check, store), with no worker competing for the CPU and the
   database, so the events stay 'received';
4. service + worker: ``python launcher.py`` as ./run.sh runs it (web,
   worker processes and its own Redis), the workers' relay queueing every
   event and the workers replying to every message through a stand-in
   Graph API (at up to SEND_RATE_PER_SECOND) while the deliveries come in.

The machine's speed drifts from minute to minute, so the ceiling is
measured before and after each service run (generator, ceiling #1, web,
ceiling #2, all, ceiling #3) and each service run is compared with the
mean of the ceiling runs on either side of it.

The load comes from wrk (with bench/deliveries.lua) when it is installed,
else from bench/loadgen.py's Python generator (--generator chooses). It
prints deliveries per second, p50 and p99 latency, errors, the ratio to the
ceiling and the CPU each part used, then checks on the service's database
that every delivery answered 200 was stored exactly once. Everything
listens on 127.0.0.1, on free ports, with its files in a temporary folder.
"""

import os
import shutil
import sys
import tempfile
import time

import common
import loadgen

#: Issue 7's targets for the service against the ceiling of the same run.
TARGET_RATIO = 0.5
TARGET_P99_MS = 25.0
CORES = os.cpu_count() or 1


def parse_args(argv):
    parser = common.parser(__doc__)
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per run (10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of load not measured (1)"
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="concurrent connections (16)"
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk when installed (auto), or the Python one",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="processes of the Python generator, sharing the connections (2)",
    )
    parser.add_argument(
        "--runs",
        default="generator,ceiling,web,all",
        help="comma-separated runs to do, of generator, ceiling, web (service "
        "without a worker), all (service with its worker); default: all four",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - {"generator", "ceiling", "web", "all"}
    if unknown:
        print(f"error: --runs: unknown run {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if loadgen.wrk_path() else "python"
    elif generator == "wrk" and not loadgen.wrk_path():
        print("error: --generator wrk, but wrk is not installed", file=sys.stderr)
        return 2

    folder = tempfile.mkdtemp(prefix="bench-ingest-")
    print(common.machine_line())
    print(
        f"load: {generator} generator, {args.connections} connections, "
        f"{args.duration:g} s measured after {args.warmup:g} s of warm-up, "
        "one message per delivery"
    )
    results = {}
    try:
        with common.GraphStandIn() as graph:
            for run in _order(runs):
                results[run] = RUNNERS[run.split()[0]](args, generator, folder, graph)
                print(f"  {run}: {results[run]['result'].rate:.0f} deliveries/s")
    finally:
        if args.keep:
            print(f"logs and databases kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    report(results)
    return 0


def _order(runs):
    """Return the runs to do, with a ceiling run before and after each service run.

    The machine's speed drifts from minute to minute: a service run is
    compared with the ceiling measured right around it (the mean of the
    runs just before and just after), not a minute earlier.
    """
    services = [run for run in runs if run in ("web", "all")]
    order = [run for run in runs if run == "generator"]
    if "ceiling" not in runs:
        return order + services
    order.append("ceiling 1")
    for number, run in enumerate(services, start=2):
        order += [run, f"ceiling {number}"]
    return order


def _ceilings_around(results, run):
    """Return the ceiling runs just before and just after a service run."""
    names = list(results)
    at = names.index(run)
    before = [n for n in names[:at] if n.startswith("ceiling")][-1:]
    after = [n for n in names[at + 1 :] if n.startswith("ceiling")][:1]
    return [results[n]["result"] for n in before + after]


def _ceiling_of(results, run):
    """Return the ceiling rate a service run is compared with, or None.

    The mean of the ceiling runs just before and just after it.
    """
    if not run.startswith(("web", "all")):
        return None
    around = _ceilings_around(results, run)
    return sum(r.rate for r in around) / len(around) if around else None


def _title(run):
    base, _, number = run.partition(" ")
    return TITLES[base] + (f" #{number}" if number else "")


def _load(args, generator, port, tag, sample):
    kwargs = dict(
        port=port,
        path=common.WEBHOOK_PATH,
        secret=common.payloads.APP_SECRET,
        account=common.payloads.ACCOUNT_ID,
        tag=tag,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        sample=sample,
    )
    if generator == "wrk":
        return loadgen.run_wrk(**kwargs)
    return loadgen.run_python(processes=args.processes, **kwargs)


def _sampler(pids):
    """Return a function reading the CPU time of these processes, and ours."""

    def sample():
        return {
            "time": time.monotonic(),
            "machine": common.machine_busy(),
            "bench": time.process_time(),
            **{label: common.cpu_seconds(pid) for label, pid in pids.items()},
        }

    return sample


def run_generator(args, generator, folder, graph):
    port = common.free_port()
    with loadgen.TrivialServer(port) as server:
        if not common.wait_until(lambda: common.port_answers(port), 15):
            raise SystemExit("error: the trivial server did not start")
        pids = {f"trivial {i}": proc.pid for i, proc in enumerate(server.procs)}
        result, samples = _load(args, generator, port, "g", _sampler(pids))
    return {"result": result, "samples": samples, "pids": pids}


def run_ceiling(args, generator, folder, graph):
    with common.Deployment(
        f"{folder}/ceiling", graph.url, **settings_of(args)
    ) as deployment:
        deployment.start_ceiling()
        pids = deployment.settled_pids()
        result, samples = _load(
            args, generator, deployment.web_port, "c", _sampler(pids)
        )
    return {"result": result, "samples": samples, "pids": pids}


def run_web_only(args, generator, folder, graph):
    with common.Deployment(
        f"{folder}/web", graph.url, **settings_of(args)
    ) as deployment:
        deployment.start_redis()
        deployment.launch("web")
        pids = deployment.settled_pids()
        result, samples = _load(
            args, generator, deployment.web_port, "w", _sampler(pids)
        )
        check = common.check_stored_once(deployment, result.answered, result.unanswered)
        statuses = deployment.statuses()
    return {
        "result": result,
        "samples": samples,
        "pids": pids,
        "check": check,
        "statuses": statuses,
    }


def run_all(args, generator, folder, graph):
    with common.Deployment(
        f"{folder}/all", graph.url, **settings_of(args)
    ) as deployment:
        deployment.launch("all")
        pids = deployment.settled_pids()
        result, samples = _load(
            args, generator, deployment.web_port, "a", _sampler(pids)
        )
        check = common.check_stored_once(deployment, result.answered, result.unanswered)
        statuses = deployment.statuses()
        replies = len(graph.snapshot()[0])
    return {
        "result": result,
        "samples": samples,
        "pids": pids,
        "check": check,
        "statuses": statuses,
        "replies": replies,
    }


RUNNERS = {
    "generator": run_generator,
    "ceiling": run_ceiling,
    "web": run_web_only,
    "all": run_all,
}
TITLES = {
    "generator": "generator vs trivial server",
    "ceiling": "ceiling: bare Flask route",
    "web": "service, web only (no worker)",
    "all": "service + worker (launcher.py)",
}


def _cores(samples, pids):
    """Return {part: cores used} over the measured window, and machine busy %."""
    before, after = samples
    seconds = after["time"] - before["time"]
    parts = {}
    for label in pids:
        part = label.split()[0]
        if part.startswith("launcher"):
            part = "launcher"
        if part in ("ceiling", "trivial"):
            part = "web"
        used = after[label] - before[label]
        parts[part] = parts.get(part, 0.0) + used / seconds
    parts["stand-in"] = (after["bench"] - before["bench"]) / seconds
    busy = (after["machine"][0] - before["machine"][0]) / max(
        1, after["machine"][1] - before["machine"][1]
    )
    return parts, busy * 100


def report(results):
    rows, cpu_rows = [], []
    for run, outcome in results.items():
        result = outcome["result"]
        ceiling = _ceiling_of(results, run)
        ratio = f"{result.rate / ceiling:.2f}" if ceiling else "-"
        workers = sum(1 for label in outcome["pids"] if label.startswith("web worker"))
        rows.append(
            [
                _title(run),
                f"{result.rate:.0f}",
                f"{result.percentile(50):.1f}",
                f"{result.percentile(99):.1f}",
                result.non_2xx,
                result.socket_errors,
                ratio,
                workers or "-",
            ]
        )
        parts, busy = _cores(outcome["samples"], outcome["pids"])
        generator_cores = result.cpu_seconds / (result.elapsed or 1)
        other = busy / 100 * CORES - generator_cores - sum(parts.values())
        cpu_rows.append(
            [
                _title(run),
                f"{busy:.0f}%",
                f"{generator_cores:.2f}",
                f"{parts.get('web', 0):.2f}",
                f"{parts.get('worker', 0):.2f}",
                f"{parts.get('redis', 0):.2f}",
                f"{parts.get('stand-in', 0):.2f}",
                f"{max(0.0, other):.2f}",
            ]
        )
    print()
    print(
        common.table(
            [
                "run",
                "deliveries/s",
                "p50 ms",
                "p99 ms",
                "non-2xx",
                "socket errors",
                "vs ceiling",
                "gunicorn workers",
            ],
            rows,
        )
    )
    print()
    print(
        f"CPU used during the measured window, in cores of {CORES} (machine busy:"
        " all cores; 'other' is the rest of it: kernel, disk writeback...):"
    )
    print(
        common.table(
            [
                "run",
                "machine busy",
                "generator",
                "web",
                "worker",
                "redis",
                "stand-in + bench",
                "other (kernel...)",
            ],
            cpu_rows,
        )
    )
    for outcome in results.values():
        kinds = outcome["result"].error_kinds
        if kinds:
            print(f"socket errors by kind: {kinds}")

    checked = [run for run in ("web", "all") if run in results]
    if checked:
        print()
        print("stored exactly once (every delivery sent in the run, warm-up included):")
        figures = list(results[checked[0]]["check"])
        print(
            common.table(
                ["check", *(TITLES[run] for run in checked)],
                [[f, *(results[r]["check"][f] for r in checked)] for f in figures]
                + [["event statuses", *(_statuses(results[r]) for r in checked)]],
            )
        )
        for run in checked:
            if not results[run]["result"].exact:
                print(
                    f"note: {TITLES[run]}: socket errors make the answered/unanswered"
                    " split approximate"
                )
    compared = [run for run in checked if _ceiling_of(results, run)]
    if compared:
        print()
        print(_verdicts(results, compared))


def _statuses(outcome):
    text = ", ".join(f"{k} {v}" for k, v in sorted(outcome["statuses"].items()))
    if "replies" in outcome:
        text += f"; {outcome['replies']} replies sent"
    return text


def _verdicts(results, checked):
    lines = [
        "issue 7 targets (each service run against the mean of the ceiling"
        " runs just before and after it):"
    ]
    for run in checked:
        result = results[run]["result"]
        ceiling = _ceiling_of(results, run)
        around = ", ".join(f"{r.rate:.0f}" for r in _ceilings_around(results, run))
        ratio = result.rate / ceiling if ceiling else 0.0
        errors = result.non_2xx + result.socket_errors
        once = common.stored_once_ok(results[run]["check"])
        p99 = result.percentile(99)
        lines.append(
            f"  {TITLES[run]}: ratio {ratio:.2f} of {ceiling:.0f}/s (ceiling runs:"
            f" {around}; >= {TARGET_RATIO}: {_yes(ratio >= TARGET_RATIO)}),"
            f" p99 {p99:.1f} ms (< {TARGET_P99_MS:g}: {_yes(p99 < TARGET_P99_MS)}),"
            f" errors {errors} ({_yes(errors == 0)}), stored once ({_yes(once)})"
        )
    return "\n".join(lines)


def _yes(ok):
    return "met" if ok else "NOT met"


def settings_of(args):
    return common.settings_from(args.settings)


if __name__ == "__main__":
    sys.exit(main())
