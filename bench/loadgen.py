"""Post unique, signed deliveries for a fixed time: with wrk, or in Python.

Both generators post one direct message per delivery, each with a ``mid``
and a sender of its own, signed like Meta signs them, over keep-alive
connections that are opened again whenever the server closes one (gunicorn's
sync workers close every connection after its answer). Latency is taken
from the start of a request (its connect, when a new one is needed) to the
last byte of the answer.

The Python generator runs ``connections`` threads spread over a few
processes, each thread one connection with one request in flight, on plain
sockets: building, signing and parsing a request costs a few tens of
microseconds, so it can go well past what the service takes. ``serve_trivial``
is a server that costs next to nothing per request, to show that ceiling.
"""

import asyncio
import hashlib
import hmac
import json
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

LUA_SCRIPT = Path(__file__).resolve().parent / "deliveries.lua"
#: A Meta-shaped delivery of one text message, compact as Meta sends it.
BODY = (
    '{"object":"instagram","entry":[{"id":"%(account)s","time":%(ms)d,'
    '"messaging":[{"sender":{"id":"%(sender)s"},"recipient":{"id":"%(account)s"},'
    '"timestamp":%(ms)d,"message":{"mid":"%(mid)s","text":"hello there"}}]}]}'
)
#: Seconds given to the generator's processes to start before the load does.
START_LEAD_SECONDS = 2.0


def mid_of(tag, connection, n):
    """Return the mid of request ``n`` (from 1) on a connection; wrk's script agrees."""
    return f"bench-{tag}-{connection}-{n}"


def sender_prefix(tag):
    """Return the first digits of this run's sender ids (wrk's script gets them)."""
    return f"9{zlib.crc32(tag.encode()) % 1000:03d}"


def sender_of(tag, connection, n):
    """Return a sender id of its own for every delivery, so each gets a reply."""
    return f"{sender_prefix(tag)}{connection:03d}{n:09d}"


@dataclass
class LoadResult:
    """What one load run measured, and which deliveries it sent."""

    generator: str
    #: Seconds from the start of the measured window to its last answer.
    elapsed: float
    #: Answers with status 200, other statuses, socket errors: measured window.
    ok: int
    non_2xx: int
    socket_errors: int
    latencies: list
    #: Mids of every delivery answered 200, warm-up included; and of the rest.
    answered: list = field(default_factory=list)
    unanswered: list = field(default_factory=list)
    #: CPU seconds the generator itself used in the measured window.
    cpu_seconds: float = 0.0
    error_kinds: dict = field(default_factory=dict)
    #: Whether the answered/unanswered split is exact for every request.
    exact: bool = True
    #: Percentiles (ms) given by the generator, when it keeps no latencies.
    given_percentiles: dict = field(default_factory=dict)

    @property
    def rate(self):
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, p):
        """Return the p-th percentile latency in milliseconds."""
        if p in self.given_percentiles:
            return self.given_percentiles[p]
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0] * 1000
        cuts = statistics.quantiles(self.latencies, n=1000, method="inclusive")
        return cuts[min(len(cuts) - 1, int(p * 10) - 1)] * 1000


# -- the Python generator -----------------------------------------------------


@dataclass
class _Spec:
    port: int
    path: str
    secret: str
    account: str
    tag: str
    first_connection: int
    connections: int
    start: float
    measure_from: float
    stop: float
    timeout: float


class _EmptyAnswer(ConnectionError):
    """The server closed the connection before answering."""


def _read_answer(sock):
    """Read one HTTP/1.1 answer; return (status, whether the connection stays)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            if buf:
                raise ConnectionError("connection closed in the middle of an answer")
            raise _EmptyAnswer("connection closed before an answer")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(None, 2)[1])
    length, close = None, lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            raise ValueError("chunked answers are not supported")
    if length is None:
        while chunk := sock.recv(65536):
            rest += chunk
        return status, False
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of a body")
        rest += chunk
    return status, not close


def _connect(spec):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(spec.timeout)
    sock.connect(("127.0.0.1", spec.port))
    return sock


def _connection_loop(spec, connection, out):
    """Post deliveries one after another on one connection until spec.stop."""
    head = (
        f"POST {spec.path} HTTP/1.1\r\nHost: 127.0.0.1:{spec.port}\r\n"
        "Content-Type: application/json\r\n"
        "X-Hub-Signature-256: sha256=%s\r\nContent-Length: %d\r\n\r\n"
    )
    key = spec.secret.encode()
    sock, n = None, 0
    time.sleep(max(0.0, spec.start - time.monotonic()))
    while (began := time.monotonic()) < spec.stop:
        n += 1
        ms = int(time.time() * 1000)
        body = (
            BODY
            % {
                "account": spec.account,
                "ms": ms,
                "sender": sender_of(spec.tag, connection, n),
                "mid": mid_of(spec.tag, connection, n),
            }
        ).encode()
        signature = hmac.new(key, body, hashlib.sha256).hexdigest()
        request = (head % (signature, len(body))).encode() + body
        try:
            for attempt in (1, 2):
                reused = sock is not None
                if sock is None:
                    sock = _connect(spec)
                try:
                    sock.sendall(request)
                    status, keep = _read_answer(sock)
                    break
                except _EmptyAnswer:
                    # A kept-alive connection the server had just closed.
                    sock.close()
                    sock = None
                    if not reused or attempt == 2:
                        raise
        except (OSError, ValueError) as exc:
            if sock is not None:
                sock.close()
                sock = None
            out["unanswered"].append(n)
            if began >= spec.measure_from:
                kind = type(exc).__name__
                out["errors"][kind] = out["errors"].get(kind, 0) + 1
            continue
        done = time.monotonic()
        if not keep:
            sock.close()
            sock = None
        (out["answered"] if status == 200 else out["unanswered"]).append(n)
        if began >= spec.measure_from:
            out["latencies"].append(done - began)
            out["ok" if status == 200 else "non_2xx"] += 1
            out["last_done"] = max(out["last_done"], done)
    if sock is not None:
        sock.close()


def _process_main(spec):
    outs = [
        {
            "answered": [],
            "unanswered": [],
            "latencies": [],
            "errors": {},
            "ok": 0,
            "non_2xx": 0,
            "last_done": spec.measure_from,
        }
        for _ in range(spec.connections)
    ]
    threads = [
        threading.Thread(
            target=_connection_loop, args=(spec, spec.first_connection + i, outs[i])
        )
        for i in range(spec.connections)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, spec.measure_from - time.monotonic()))
    cpu_before = time.process_time()
    time.sleep(max(0.0, spec.stop - time.monotonic()))
    cpu = time.process_time() - cpu_before
    for thread in threads:
        thread.join()
    return spec.first_connection, outs, cpu


def run_python(
    port,
    path,
    secret,
    account,
    tag,
    duration,
    warmup=1.0,
    connections=16,
    processes=2,
    timeout=10.0,
    sample=None,
):
    """Load the server with the Python generator; return a LoadResult.

    ``sample``, when given, is called at the start and at the end of the
    measured window, and its two results are returned beside the LoadResult.
    """
    start = time.monotonic() + START_LEAD_SECONDS
    measure_from, stop = start + warmup, start + warmup + duration
    processes = max(1, min(processes, connections))
    shares = [
        connections // processes + (i < connections % processes)
        for i in range(processes)
    ]
    specs, first = [], 0
    for share in shares:
        specs.append(
            _Spec(
                port,
                path,
                secret,
                account,
                tag,
                first,
                share,
                start,
                measure_from,
                stop,
                timeout,
            )
        )
        first += share

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [pool.submit(_process_main, spec) for spec in specs]
        samples = _sample_window(sample, measure_from, stop)
        outcomes = [future.result() for future in futures]

    result = LoadResult("python", 0.0, 0, 0, 0, [])
    last_done = stop
    for first, outs, cpu in outcomes:
        result.cpu_seconds += cpu
        for i, out in enumerate(outs):
            connection = first + i
            result.answered += [mid_of(tag, connection, n) for n in out["answered"]]
            result.unanswered += [mid_of(tag, connection, n) for n in out["unanswered"]]
            result.latencies += out["latencies"]
            result.ok += out["ok"]
            result.non_2xx += out["non_2xx"]
            for kind, count in out["errors"].items():
                result.error_kinds[kind] = result.error_kinds.get(kind, 0) + count
            last_done = max(last_done, out["last_done"])
    result.socket_errors = sum(result.error_kinds.values())
    result.elapsed = last_done - measure_from
    return result, samples


def _sample_window(sample, measure_from, stop):
    if sample is None:
        return None
    time.sleep(max(0.0, measure_from - time.monotonic()))
    before = sample()
    time.sleep(max(0.0, stop - time.monotonic()))
    return before, sample()


# -- wrk ----------------------------------------------------------------------


def wrk_path():
    """Return the path of wrk, or None when it is not installed."""
    return shutil.which("wrk")


def run_wrk(
    port,
    path,
    secret,
    account,
    tag,
    duration,
    warmup=1.0,
    connections=16,
    timeout=10.0,
    sample=None,
):
    """Load the server with wrk and deliveries.lua; return a LoadResult.

    wrk runs one thread per connection, so each thread's answers come in the
    order of its requests and the script can tell which delivery each answer
    belongs to.
    """
    if warmup > 0:
        warm, _ = _wrk_once(
            port, path, secret, account, f"{tag}w", warmup, connections, timeout, None
        )
    main, samples = _wrk_once(
        port, path, secret, account, tag, duration, connections, timeout, sample
    )
    if warmup > 0:
        main.answered += warm.answered
        main.unanswered += warm.unanswered
        main.exact = main.exact and warm.exact
    return main, samples


def _wrk_once(port, path, secret, account, tag, duration, connections, timeout, sample):
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as folder:
        out_path = os.path.join(folder, "threads.txt")
        env = {
            **os.environ,
            "BENCH_SECRET": secret,
            "BENCH_ACCOUNT": account,
            "BENCH_TAG": tag,
            "BENCH_SENDER_PREFIX": sender_prefix(tag),
            "BENCH_PATH": path,
            "BENCH_OUT": out_path,
        }
        argv = [
            wrk_path(),
            f"-t{connections}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s",
            "-s",
            str(LUA_SCRIPT),
            f"http://127.0.0.1:{port}{path}",
        ]
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        before = sample() if sample else None
        output, _ = proc.communicate(timeout=duration + timeout + 30)
        after = sample() if sample else None
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"error: wrk failed:\n{output.decode(errors='replace')}")
        with open(out_path) as f:
            lines = f.read().splitlines()

    summary = json.loads(lines[0])
    result = LoadResult(
        "wrk",
        elapsed=summary["duration_us"] / 1e6,
        ok=summary["requests"] - summary["status_errors"],
        non_2xx=summary["status_errors"],
        socket_errors=sum(summary[k] for k in ("connect", "read", "write", "timeout")),
        # wrk gives percentiles, not every latency: keep the ones asked for.
        latencies=[],
        cpu_seconds=(usage_after.ru_utime + usage_after.ru_stime)
        - (usage_before.ru_utime + usage_before.ru_stime),
        error_kinds={
            k: summary[k] for k in ("connect", "read", "write", "timeout") if summary[k]
        },
    )
    result.given_percentiles = {
        50: summary["p50_us"] / 1000,
        99: summary["p99_us"] / 1000,
    }
    # Answers come in request order on each connection; after a socket error
    # they may not, and the split below is then only close.
    result.exact = result.socket_errors == 0
    result.non_2xx = 0
    for line in lines[1:]:
        connection, sent, answered, bad = json.loads(line)
        bad = dict(bad)
        result.non_2xx += len(bad)
        for n in range(1, sent + 1):
            mid = mid_of(tag, connection, n)
            if n <= answered and str(n) not in bad:
                result.answered.append(mid)
            else:
                result.unanswered.append(mid)
    result.ok = summary["requests"] - result.non_2xx
    return result, (before, after) if sample else None


# -- a trivial server ---------------------------------------------------------

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class _Trivial(asyncio.Protocol):
    """Answer 200 to each request once its body is in, then close, as gunicorn does."""

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data):
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self.buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) - end - 4 >= length:
            self.transport.write(_ANSWER)
            self.transport.close()


def _serve_trivial(port):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            _Trivial, "127.0.0.1", port, reuse_port=True, backlog=2048
        )
        await server.serve_forever()

    asyncio.run(main())


class TrivialServer:
    """A server that answers 200 at almost no cost, in ``processes`` processes."""

    def __init__(self, port, processes=2):
        context = multiprocessing.get_context("spawn")
        self.port = port
        self.procs = [
            context.Process(target=_serve_trivial, args=(port,), daemon=True)
            for _ in range(processes)
        ]

    def __enter__(self):
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.terminate()
            proc.join(10)
