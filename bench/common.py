"""What the benchmarks share: the service's processes, a stand-in Graph API, readings.

Everything listens on 127.0.0.1, on free ports, with its files in a
temporary folder. The service is started as the README starts it
(``python launcher.py``), with a Redis of our own only where a role of the
launcher that never starts one (``web``, ``worker``) is used.
"""

import argparse
import collections
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]

import payloads  # noqa: E402

import events  # noqa: E402
import launcher  # noqa: E402
import storage  # noqa: E402

WEBHOOK_PATH = "/webhooks/instagram"
FINAL = ("done", "ignored", "dead")
#: Settings of the service left to their defaults: none of ours may leak in.
_SERVICE_PREFIXES = (
    "IG_",
    "GRAPH_",
    "REDIS_",
    "DATABASE_",
    "REPLY_",
    "RETRY_",
    "AUTO_REPLY",
    "QUEUED_",
    "MAX_BODY",
    "HOST",
    "PORT",
    "LOG_",
    "METRICS_",
    "DASHBOARD_",
    "RQ_",
    "PROMETHEUS_",
    "SEND_RATE",
    "ENV_FILE",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser(doc):
    """Return a script's argument parser, with --keep and --set already in it."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder and its logs"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the service for every run, e.g. LOG_LEVEL=WARNING "
        "(repeatable; defaults otherwise, as in the README)",
    )
    return parser


def settings_from(pairs):
    """Return {NAME: VALUE} from --set values; exit with a message on a bad one."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"error: --set: expected NAME=VALUE, got {pair!r}")
        settings[name.strip()] = value
    return settings


def wait_until(predicate, seconds, interval=0.05):
    """Poll until predicate() is truthy; return its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_until_steady(measure, readings=3, interval=0.2, seconds=30):
    """Poll measure() until it gives the same value ``readings`` times running."""
    values = []

    def steady():
        values.append(measure())
        return len(values) >= readings and len(set(values[-readings:])) == 1

    return wait_until(steady, seconds, interval)


def port_answers(port):
    """Return True when something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get_status(port, path, timeout=2.0):
    """Return the status of GET path on 127.0.0.1:port, or None when unreachable."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


# -- the service's processes --------------------------------------------------


class Deployment:
    """Redis, web and worker processes of one run, in a folder of their own.

    ``launch("all")`` runs ``python launcher.py`` exactly as ./run.sh does
    (it starts its own Redis, since nothing answers on our free port);
    ``launch("web")`` or ``launch("worker")`` run one part, after
    ``start_redis()`` started a Redis with the launcher's own flags.
    """

    def __init__(self, folder, graph_url, **settings):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.web_port = free_port()
        self.db_path = str(self.folder / "data" / "webhooks.db")
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_PREFIXES)
        }
        self.env.update(
            {
                "ENV_FILE": str(self.folder / "no.env"),
                "IG_APP_SECRET": payloads.APP_SECRET,
                "IG_VERIFY_TOKEN": payloads.VERIFY_TOKEN,
                "IG_ACCESS_TOKEN": payloads.ACCESS_TOKEN,
                "IG_ACCOUNT_ID": payloads.ACCOUNT_ID,
                "GRAPH_API_BASE": graph_url,
                "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "DATABASE_PATH": self.db_path,
                "HOST": "127.0.0.1",
                "PORT": str(self.web_port),
                "PYTHONUNBUFFERED": "1",
                **settings,
            }
        )
        #: name -> Popen, in start order.
        self.procs = {}

    def _spawn(self, name, argv):
        log = open(self.folder / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            argv, cwd=PROJECT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self.procs[name]

    def start_redis(self):
        """Start redis-server as launcher.py would: append-only, next to the data."""
        data_dir = os.path.dirname(self.db_path)
        os.makedirs(data_dir, exist_ok=True)
        server = shutil.which("redis-server") or "redis-server"
        self._spawn("redis", launcher.redis_argv(server, self.redis_port, data_dir))
        self._expect(lambda: port_answers(self.redis_port), "redis", 15)

    def launch(self, role="all"):
        """Run launcher.py (with ROLE unless it is "all") and wait until it serves."""
        argv = [sys.executable, str(PROJECT / "launcher.py")]
        name = "launcher" if role == "all" else f"launcher-{role}"
        self._spawn(name, argv if role == "all" else [*argv, role])
        if role in ("all", "web"):
            self._expect(
                lambda: http_get_status(self.web_port, "/healthz") == 200, name, 60
            )
        if role in ("all", "worker"):
            self.wait_worker_listening(name)
        return self.procs[name]

    def start_ceiling(self):
        """Serve bench/ceiling_app.py with gunicorn as launcher.py serves the app.

        Started from the project folder with the same settings, so gunicorn
        reads the same gunicorn.conf.py: same workers, timeouts and logging.
        """
        self._spawn(
            "ceiling", [sys.executable, "-m", "gunicorn", "bench.ceiling_app:app"]
        )
        self._expect(
            lambda: http_get_status(self.web_port, "/") is not None, "ceiling", 60
        )

    def wait_worker_listening(self, name):
        """Wait until RQ says the worker listens on the queue."""
        log = self.folder / f"{name}.log"
        self._expect(
            lambda: "Listening on" in log.read_text(errors="replace"), name, 60
        )

    def _expect(self, predicate, name, seconds):
        proc = self.procs[name]
        if not wait_until(lambda: predicate() or proc.poll() is not None, seconds):
            raise SystemExit(f"error: {name} did not start in {seconds}s; see its log")
        if proc.poll() is not None:
            raise SystemExit(
                f"error: {name} exited with status {proc.returncode}:\n"
                + self.log_tail(name)
            )

    def log_tail(self, name, lines=20):
        """Return the last lines of a process's log."""
        path = self.folder / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def settled_pids(self, seconds=1.0, limit=15.0):
        """Return pids() once it has not changed for ``seconds`` (workers forked)."""
        last, since = self.pids(), time.monotonic()
        deadline = since + limit
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.pids()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                break
        return last

    def pids(self):
        """Return {label: pid} of every process of the deployment and its children."""
        found = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                found.update(label_tree(proc.pid, name))
        return found

    def stop(self):
        """Stop launchers (newest first, with SIGTERM), then our Redis."""
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the database --------------------------------------------------------

    def query(self, sql, params=()):
        """Run a read query on the service's database; return the rows.

        The inbox is attached as ``inbox``; UNMOVED selects the keys of the
        events in it that no relay has moved into webhook_events yet.
        """
        with sqlite3.connect(self.db_path, timeout=30) as db:
            db.execute(
                "ATTACH DATABASE ? AS inbox", (self.db_path + storage.INBOX_SUFFIX,)
            )
            return db.execute(sql, params).fetchall()

    UNMOVED = (
        "SELECT event_key FROM inbox.inbox_events WHERE id > coalesce(("
        " SELECT events FROM inbox_moved"
        " WHERE inbox = (SELECT id FROM inbox.inbox_info)), 0)"
    )

    def statuses(self):
        """Return {status: count} of stored events, 'received' in the inbox too."""
        counts = dict(
            self.query("SELECT status, COUNT(*) FROM webhook_events GROUP BY status")
        )
        [(unmoved,)] = self.query(f"SELECT COUNT(*) FROM ({self.UNMOVED})")
        if unmoved:
            counts["received"] = counts.get("received", 0) + unmoved
        return counts

    def event_keys(self):
        """Return every stored event key, duplicates included."""
        return [
            row[0]
            for row in self.query(
                f"SELECT event_key FROM webhook_events UNION ALL {self.UNMOVED}"
            )
        ]


def message_key(mid):
    """Return the event key the service gives a plain message with this mid."""
    return events.event_key("messaging", {"message": {"mid": mid}})


def check_stored_once(deployment, answered, unanswered=()):
    """Compare stored events with the mids sent; return {figure: value}.

    ``answered`` are the mids of deliveries answered 200; ``unanswered`` those
    sent without a 200 (an error, or still in flight when the run stopped),
    which may or may not have been stored.
    """
    # Requests still in the server's hands when the load stopped land now.
    wait_until_steady(lambda: len(deployment.event_keys()))
    answered_keys = {message_key(mid) for mid in answered}
    other_keys = {message_key(mid) for mid in unanswered} - answered_keys
    stored = deployment.event_keys()
    stored_set = set(stored)
    return {
        "answered 200": len(answered_keys),
        "rows stored": len(stored),
        "rows stored twice": len(stored) - len(stored_set),
        "answered 200 but not stored": len(answered_keys - stored_set),
        "stored, sent without a 200": len(stored_set & other_keys),
        "stored, never sent": len(stored_set - answered_keys - other_keys),
    }


def stored_once_ok(figures):
    """Return True when every answered delivery is stored once and nothing else."""
    return (
        figures["rows stored twice"] == 0
        and figures["answered 200 but not stored"] == 0
        and figures["stored, never sent"] == 0
    )


def post(port, raw, timeout=60.0):
    """POST a correctly signed body; return (status, answer bytes, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = payloads.signed_headers(raw)
    started = time.perf_counter()
    try:
        conn.request("POST", WEBHOOK_PATH, body=raw, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        return response.status, answer, time.perf_counter() - started
    finally:
        conn.close()


def direct_messages(count, tag, per_delivery=100):
    """Yield (raw body, [mids]) of deliveries holding ``count`` messages in all.

    Every message has a sender of its own, so each one gets a reply of its
    own whatever the reply cooldown.
    """
    for start in range(0, count, per_delivery):
        items, mids = [], []
        for i in range(start, min(count, start + per_delivery)):
            mid = f"bench-{tag}-{i}"
            sender = f"93{zlib.crc32(tag.encode()) % 10**6:06d}{i:08d}"
            items.append(payloads.text_message(sender, "hello there", mid=mid))
            mids.append(mid)
        yield payloads.body(payloads.delivery(*items)), mids


# -- the stand-in Graph API ---------------------------------------------------


class GraphStandIn:
    """A Send API stand-in on 127.0.0.1 that answers every call after ``latency``.

    Records the monotonic time of every call and each recipient, so a run can
    count sends per second and check that nobody got two replies.
    """

    def __init__(self, latency=0.0):
        self.latency = latency
        self.times = []
        self.recipients = collections.Counter()
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without this, Nagle's algorithm adds ~40 ms to every answer.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    recipient = json.loads(raw)["recipient"]
                    recipient = str(recipient.get("id") or recipient.get("comment_id"))
                except (ValueError, KeyError, AttributeError):
                    recipient = "?"
                if stand_in.latency:
                    time.sleep(stand_in.latency)
                with stand_in._lock:
                    stand_in.times.append(time.monotonic())
                    stand_in.recipients[recipient] += 1
                    number = len(stand_in.times)
                data = json.dumps(
                    {"recipient_id": recipient, "message_id": f"m_{number}"}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self):
        """Return (call times, recipient counts) so far."""
        with self._lock:
            return list(self.times), collections.Counter(self.recipients)


def max_in_window(times, window=1.0):
    """Return the largest number of times that fall within any one window."""
    times = sorted(times)
    best, first = 0, 0
    for last, moment in enumerate(times):
        while moment - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


# -- processes, CPU and memory ------------------------------------------------


def _children():
    """Return {parent pid: [child pids]} of every process now running."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    return children


def cmdline(pid):
    """Return a process's command line as one string ('' once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def label_tree(root, name):
    """Return {label: pid} of a process and its descendants, labelled by role."""
    children = _children()
    labels = {}

    def walk(pid, parent_label):
        line = cmdline(pid)
        if "redis-server" in line:
            label = "redis"
        elif "gunicorn" in line:
            label = "web worker" if parent_label.startswith("web") else "web master"
        elif "worker.py" in line:
            label = "worker child" if parent_label.startswith("worker") else "worker"
        elif "launcher.py" in line:
            label = name
        else:
            label = f"{parent_label} child"
        unique, n = label, 2
        while unique in labels:
            unique, n = f"{label} {n}", n + 1
        labels[unique] = pid
        for child in sorted(children.get(pid, ())):
            walk(child, label)

    walk(root, name)
    return labels


def cpu_seconds(pid):
    """Return user + system CPU seconds a live process has used (0 once gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy():
    """Return (busy, total) CPU jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def memory_of(pid):
    """Return (RSS kB, PSS kB or None) of a process, from /proc."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        return None, None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def memory_rows(pids):
    """Return table rows [label, pid, RSS MB, PSS MB] and a total row."""
    rows, total_rss, total_pss, pss_known = [], 0, 0, True
    for label, pid in pids.items():
        rss, pss = memory_of(pid)
        if rss is None:
            continue
        total_rss += rss
        if pss is None:
            pss_known = False
        else:
            total_pss += pss
        rows.append([label, pid, mb(rss), "-" if pss is None else mb(pss)])
    rows.append(["total", "", mb(total_rss), mb(total_pss) if pss_known else "-"])
    return rows


def mb(kilobytes):
    return f"{kilobytes / 1024:.1f}"


# -- output -------------------------------------------------------------------


def table(headers, rows):
    """Return rows as a Markdown table, numbers right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        padded = (c.ljust(w) for c, w in zip(row, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def machine_line():
    """Return one line describing this machine: cores, CPU model, Python."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"machine: {os.cpu_count()} cores ({model}), Python "
        f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
