"""An HTTP server in a process of its own, started on a free port of 127.0.0.1 and stopped again.

What the suite's `serving` (tests/conftest.py) and the benchmarks' (bench/perfapi_figures.py,
bench/loadtest.py) share: start a command with the port filled in, wait until it answers
`GET /healthz` with 200, and on leaving stop it with SIGTERM (SIGKILL only if it hangs).
Only the standard library: the benchmarks import this without pytest or httpx.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.pg_server import free_port


class ServerFailed(RuntimeError):
    """The server exited, or never answered /healthz; the message ends with its log's last lines."""


@contextmanager
def running(
    name: str, command: Sequence[str], env: dict[str, str], log: Path, timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`command` (`{port}` in any part filled in) running and healthy, logging to `log`; yields
    the process and its port. `timeout` guards against a hang only (waiting for health, then for the exit)."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        _wait_healthy(name, process, f"http://127.0.0.1:{port}/healthz", log, timeout)
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(name: str, process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"{name} exited with {process.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not listening yet (urllib's errors are OSErrors)
            time.sleep(0.1)
    raise ServerFailed(f"{name} never answered /healthz: {_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:]) or "(no output)"
