"""The API's figure: `GET /users/me` on one `usermgr serve` worker against a bare FastAPI app
(bench/bare_api.py) doing the same work by hand, both under uvicorn with the same settings, on
the same database and token, driven by the same load generator in turns within one run.

The load generator is wrk when it is on PATH (Debian: `apt-get install wrk`), else a pool of
Python threads on keep-alive `http.client` connections; it costs the 2 cores less than a
Python one, but either drives both sides alike. CPU per request is each server's own CPU time
(/proc, its process tree) over the requests it answered: the cross-check the other figures get
from rusage.

Also the pieces bench/loadtest.py reuses: starting a server and waiting for it to answer,
driving an endpoint, a process tree's CPU time.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Figure, Goal, progress

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # tests.server_process, shared with the suite

from tests.server_process import running  # noqa: E402

BARE_API = str(BENCH / "bare_api.py")
CONNECTIONS = 8
ROUNDS = 5
ROUND_SECONDS = 6.0
WARMUP_SECONDS = 2.0
START_TIMEOUT = 120.0  # a guard against a hang, not a budget
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- servers ----------------------------------------------------------------------------


@dataclass
class Server:
    """A running HTTP server (a process tree) on 127.0.0.1:`port`."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and every process under it, so far."""
        return sum(_cpu_of(pid) for pid in _tree(self.process.pid))


@contextmanager
def serving(name: str, cmd: Sequence[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """`cmd` started with `{port}` filled in, answering /healthz; stopped (SIGTERM) on leaving.
    The suite's `serving` does the same through the same module, tests/server_process.py."""
    with running(name, cmd, env, log, START_TIMEOUT) as (process, port):
        yield Server(name, process, port, log)


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers), as /proc lists them now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:
                continue
    return found


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


# ---- driving a server --------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What one drive of one endpoint gave: answers by status, over how long, at what CPU cost."""

    requests: int
    seconds: float
    failures: int  # answers other than the one expected, and transport errors
    server_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float:
        return self.server_cpu / self.requests if self.requests else float("inf")


def drive(server: Server, path: str, headers: dict[str, str], seconds: float, connections: int = CONNECTIONS) -> Load:
    """GET `path` on `connections` keep-alive connections for `seconds`; wrk if present."""
    before = server.cpu_seconds()
    load = _wrk(server, path, headers, seconds, connections) if shutil.which("wrk") else None
    if load is None:
        load = _threads(server, lambda: ("GET", path, None, headers, 200), seconds, connections)
    return Load(load.requests, load.seconds, load.failures, server.cpu_seconds() - before)


def _wrk(server: Server, path: str, headers: dict[str, str], seconds: float, connections: int) -> Load | None:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    output = subprocess.run([*cmd, server.base_url + path], capture_output=True, text=True, check=False).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", output)
    if total is None:
        return None
    elapsed = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    failures = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|timeout)\s*:?\s*(\d+)", output))
    return Load(int(total.group(1)), elapsed, failures)


Request = tuple[str, str, bytes | None, dict[str, str], int]
"""method, path, body, headers, and the status expected."""


def _threads(server: Server, next_request: Callable[[], Request], seconds: float, connections: int) -> Load:
    """`connections` threads, each on its own keep-alive connection, until `seconds` pass."""
    counts = [0, 0]  # requests, failures
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        done = failed = 0
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=START_TIMEOUT)
        while time.monotonic() < deadline:
            method, path, body, headers, expected = next_request()
            try:
                connection.request(method, path, body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                failed += answer.status != expected
            except (OSError, http.client.HTTPException):
                failed += 1
                connection.close()
            done += 1
        connection.close()
        with lock:
            counts[0] += done
            counts[1] += failed

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Load(counts[0], time.monotonic() - started, counts[1])


def generator() -> str:
    return f"wrk, 1 thread, {CONNECTIONS} connections" if shutil.which("wrk") else f"{CONNECTIONS} Python threads"


# ---- the figure ---------------------------------------------------------------------------


def usermgr_serve(usermgr: str, db: Path | str, *options: str) -> list[str]:
    return [usermgr, "--db", str(db), "serve", "--port", "{port}", *options]


def bare_api(python: str, *options: str) -> list[str]:
    return [python, BARE_API, "--port", "{port}", *options]


def compare_me(
    ours: Server, bare: Server, token: str, rounds: int = ROUNDS, seconds: float = ROUND_SECONDS
) -> tuple[list[Load], list[Load]]:
    """`GET /users/me` on both servers, in turns: `rounds` drives of `seconds` each, after a warm-up."""
    headers = {"Authorization": f"Bearer {token}"}
    for server in (ours, bare):
        drive(server, "/users/me", headers, WARMUP_SECONDS)
    measured: tuple[list[Load], list[Load]] = ([], [])
    for _ in range(rounds):
        for server, loads in zip((ours, bare), measured, strict=True):
            loads.append(drive(server, "/users/me", headers, seconds))
    return measured


def me_figure(key: str, what: str, ours: list[Load], bare: list[Load], baseline_what: str) -> Figure:
    failures = sum(load.failures for load in (*ours, *bare))
    ours_rate = statistics.median(load.rate for load in ours)
    bare_rate = statistics.median(load.rate for load in bare)
    cpu_ours = statistics.median(load.cpu_per_request for load in ours)
    cpu_bare = statistics.median(load.cpu_per_request for load in bare)
    figure = Figure(
        key, what, "req/s", ours_rate, bare_rate, baseline_what, Goal(low=0.5), cpu_ratio=cpu_bare / cpu_ours
    )
    turns = ", ".join(f"{a.rate / b.rate:.2f}" for a, b in zip(ours, bare, strict=True))
    figure.note = (
        f"CPU a request: usermgr {cpu_ours * 1000:.2f} ms, bare app {cpu_bare * 1000:.2f} ms;"
        f" ratios of the {len(ours)} turns {turns}"
    )
    if failures:
        figure.error = f"{failures} answers were not 200"
    return figure


def users_me(ws: Any) -> list[Figure]:
    """Figure api: one worker each, on the benchmark's one-user SQLite database."""
    python, usermgr = sys.executable, str(Path(sys.executable).parent / "usermgr")
    env = {**os.environ, "USERMGR_DATABASE_URL": f"sqlite:///{ws.small_db}"}
    token = ws.token
    with (
        serving("usermgr serve", usermgr_serve(usermgr, ws.small_db), env, ws.root / "serve.log") as ours,
        serving("bare app", bare_api(python), env, ws.root / "bare.log") as bare,
    ):
        progress(f"  driving GET /users/me: {ROUNDS} turns of {ROUND_SECONDS:.0f} s a side ({generator()})")
        measured, baseline = compare_me(ours, bare, token)
    what = "`GET /users/me` on one `usermgr serve` worker (SQLite)"
    baseline_what = f"bench/bare_api.py, by hand: PyJWT + one SELECT, same uvicorn settings; {generator()}"
    return [me_figure("api", what, measured, baseline, baseline_what)]
