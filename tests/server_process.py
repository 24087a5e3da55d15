"""An HTTP server in a process of its own, started on a free port of 127.0.0.1 and stopped again.

What the suite's `serving` (tests/conftest.py) and the benchmarks' (bench/perfapi_figures.py,
bench/loadtest.py) share: start a command with the port filled in, wait until it answers
`GET /healthz` with 200 from a socket it listens on itself, and on leaving stop it with
SIGTERM (SIGKILL only if it hangs). Only the standard library: the benchmarks import this
without pytest or httpx.

The port is free when picked, but another process (a second test run beside this one) may
take it before the server binds it: then the server fails to bind, or, worse, /healthz is
answered by the other server. Either way the start is tried again on a fresh port.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.pg_server import free_port

START_ATTEMPTS = 5  # a fresh port each time another process took the one we picked


class ServerFailed(RuntimeError):
    """The server exited, or never answered /healthz; the message ends with its log's last lines."""


@contextmanager
def running(
    name: str, command: Sequence[str], env: dict[str, str], log: Path, timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`command` (`{port}` in any part filled in) running and healthy, logging to `log`; yields
    the process and its port. `timeout` guards against a hang only (waiting for health, then for the exit)."""
    for _ in range(START_ATTEMPTS):
        port = free_port()
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [part.replace("{port}", str(port)) for part in command], env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        try:
            started = _wait_healthy(name, process, port, log, timeout)
        except BaseException:
            _stop(process, timeout)
            raise
        if started:
            break
        _stop(process, timeout)  # it lost its port to another process
    else:
        raise ServerFailed(f"{name} lost its port to another process {START_ATTEMPTS} times: {_tail(log)}")
    try:
        yield process, port
    finally:
        _stop(process, timeout)


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_healthy(name: str, process: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> bool:
    """True once `process` answers /healthz on `port`; False if another process holds the port
    (the answer came from a socket that is not the server's, or the server could not bind)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "address already in use" in _tail(log):
                return False
            raise ServerFailed(f"{name} exited with {process.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as answer:
                if answer.status == 200:
                    return listens(process.pid, port)
        except OSError:  # not listening yet (urllib's errors are OSErrors)
            time.sleep(0.1)
    raise ServerFailed(f"{name} never answered /healthz: {_tail(log)}")


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port` (Linux: /proc/net/tcp*,
    /proc/PID/fd; where /proc is missing, the answer is taken as the server's)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return True
    listening = set()
    for table in tables:
        with suppress(FileNotFoundError):  # no IPv6
            for row in table.read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    listening.add(f"socket:[{fields[9]}]")
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(FileNotFoundError):  # closed as it was listed
            held.add(os.readlink(fd))
    return bool(listening & held)


def _tail(log: Path, lines: int = 20) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:]) or "(no output)"
