"""Measuring subprocesses and reporting figures: the parts of the benchmark that know nothing of usermgr."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO

_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on standard error, with the seconds since the benchmark began."""
    print(f"[bench {time.perf_counter() - _STARTED:5.0f}s] {message}", file=sys.stderr, flush=True)


# ---- running one subprocess -------------------------------------------------------------


class StepFailed(RuntimeError):
    """A command did not exit as it should: its figure records this instead of a number."""


@dataclass(frozen=True)
class Proc:
    """One finished subprocess: wall time, CPU time (user + system), peak RSS, stdout if kept."""

    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    stdout: str = ""


def run(
    cmd: Sequence[str],
    *,
    stdin: str | Path | None = None,
    ok: Sequence[int] = (0,),
    capture: bool = False,
    env: dict[str, str] | None = None,
) -> Proc:
    """Run `cmd` to completion, timed from just before the fork to the reaping.

    `stdin` is text to feed or a file to read; stdout goes to /dev/null unless `capture`.
    CPU time and peak RSS are this child's (and its children's), from wait4's rusage.
    """
    with ExitStack() as stack:
        errors = stack.enter_context(tempfile.TemporaryFile())
        output: IO[bytes] | int = stack.enter_context(tempfile.TemporaryFile()) if capture else subprocess.DEVNULL
        source = _stdin(stack, stdin)
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdin=source, stdout=output, stderr=errors, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode not in ok:
            raise StepFailed(f"`{_short(cmd)}` exited {child.returncode}: {_last_line(errors)}")
        text = _read(output) if capture and not isinstance(output, int) else ""
        return Proc(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text)


def _stdin(stack: ExitStack, stdin: str | Path | None) -> IO[bytes] | int:
    if stdin is None:
        return subprocess.DEVNULL
    if isinstance(stdin, Path):
        return stack.enter_context(stdin.open("rb"))
    handle = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the stack closes it)
    handle.write(stdin.encode())
    handle.seek(0)
    return handle


def _read(handle: IO[bytes]) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")


def _last_line(handle: IO[bytes]) -> str:
    lines = _read(handle).strip().splitlines()
    return lines[-1] if lines else "(nothing on stderr)"


def _short(cmd: Sequence[str]) -> str:
    words = [Path(word).name if word.startswith("/") else word for word in cmd]
    text = " ".join(words)
    return text if len(text) <= 100 else text[:97] + "..."


# ---- several runs -----------------------------------------------------------------------


def alternate(runs: int, *steps: Callable[[int], Proc], warmup: bool = False) -> list[list[Proc]]:
    """Run each step `runs` times, taking turns, so that a change in the machine's load (other
    jobs share it) falls on the measured command and its baseline alike. Each step gets the
    run's index; with `warmup`, each runs once first (index -1) to fill the page cache."""
    if warmup:
        for step in steps:
            step(-1)
    results: list[list[Proc]] = [[] for _ in steps]
    for index in range(runs):
        for step, bucket in zip(steps, results, strict=True):
            bucket.append(step(index))
    return results


def median_seconds(procs: Sequence[Proc]) -> float:
    return statistics.median(proc.seconds for proc in procs)


def cpu_ratio(measured: Sequence[Proc], baseline: Sequence[Proc], *, rate: bool) -> float:
    """The figure's ratio by median CPU time instead of wall time: a cross-check that waiting for
    a core (other jobs) does not sway; swings in the machine's own speed sway both alike."""
    ours = statistics.median(proc.cpu_seconds for proc in measured)
    theirs = statistics.median(proc.cpu_seconds for proc in baseline)
    return theirs / ours if rate else ours / theirs


def peak_rss(procs: Sequence[Proc]) -> float:
    return max(proc.peak_rss_mib for proc in procs)


def import_costs(cmd: Sequence[str]) -> dict[str, float]:
    """Milliseconds of self time per module that `cmd` (a `python -X importtime ...`) imports."""
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    costs: dict[str, float] = {}
    for line in result.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[0].strip().isdigit():
            costs[parts[2].strip()] = int(parts[0]) / 1000
    return costs


def extra_imports(measured: Sequence[str], baseline: Sequence[str], top: int = 6) -> str:
    """Which packages `measured` imports beyond what `baseline` imports, costliest first."""
    baseline_modules = import_costs(baseline)
    by_package: dict[str, float] = {}
    for module, ms in import_costs(measured).items():
        if module not in baseline_modules:
            package = module.split(".")[0]
            by_package[package] = by_package.get(package, 0.0) + ms
    ranked = sorted(by_package.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{package} {ms:.0f}" for package, ms in ranked[:top])
    total = sum(by_package.values())
    return f"imports beyond the baseline's, ms of self time by package (-X importtime): {listed}; all {total:.0f}"


# ---- figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """What a figure should reach: bounds on its ratio to the baseline, or on the measured value."""

    low: float | None = None
    high: float | None = None
    on_ratio: bool = True
    strict: bool = False
    unit: str = ""

    def __str__(self) -> str:
        subject = "ratio" if self.on_ratio else "measured"
        unit = f" {self.unit}" if self.unit else ""
        below = "<" if self.strict else "<="
        if self.low is not None and self.high is not None:
            return f"{self.low:g} <= {subject} {below} {self.high:g}{unit}"
        if self.low is not None:
            return f"{subject} >= {self.low:,g}{unit}"
        return f"{subject} {below} {self.high:,g}{unit}"

    def met(self, value: float) -> bool:
        above_low = self.low is None or value >= self.low
        below_high = self.high is None or (value < self.high if self.strict else value <= self.high)
        return above_low and below_high

    def shortfall(self, value: float) -> str:
        """How far a missed goal is: the factor the value is off by."""
        if self.low is not None and value < self.low:
            return f"{self.low / value:.2f}x too low" if value > 0 else "zero"
        if self.high is not None and value >= self.high:
            return f"{value / self.high:.2f}x too high"
        return "met"


@dataclass
class Figure:
    """One row of the results: a measured value beside its baseline, and the goal it is held to."""

    key: str
    what: str
    unit: str = ""
    measured: float | None = None
    baseline: float | None = None
    baseline_what: str = ""
    goal: Goal | None = None
    note: str = ""
    error: str | None = None
    cpu_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.measured is None or not self.baseline:
            return None
        return self.measured / self.baseline

    @property
    def judged(self) -> float | None:
        """The value the goal is about: the ratio, or the measured value itself."""
        if self.goal is None:
            return None
        return self.ratio if self.goal.on_ratio else self.measured

    @property
    def met(self) -> bool | None:
        value = self.judged
        return None if value is None or self.goal is None or self.error else self.goal.met(value)

    def cells(self, *, markdown: bool) -> list[str]:
        baseline = amount(self.baseline, self.unit)
        if markdown and self.baseline_what:
            baseline = f"{baseline} ({self.baseline_what})" if self.baseline is not None else self.baseline_what
        met = "error" if self.error else {True: "yes", False: "**no**" if markdown else "NO", None: "-"}[self.met]
        ratio = ratio_text(self.ratio) if self.ratio is not None else "-"
        cpu = ratio_text(self.cpu_ratio) if self.cpu_ratio is not None else "-"
        return [self.key, self.what, amount(self.measured, self.unit), baseline, ratio, cpu, str(self.goal or "-"), met]


def ratio_text(ratio: float) -> str:
    """Enough digits to see which side of a goal such as 1.5 a ratio falls."""
    return f"{ratio:.3f}" if ratio < 10 else f"{ratio:,.1f}" if ratio < 100 else f"{ratio:,.0f}"


def versus(
    key: str,
    what: str,
    measured: Sequence[Proc],
    baseline: Sequence[Proc],
    baseline_what: str,
    goal: Goal | None,
    *,
    count: int | None = None,
    unit: str = "s",
    cpu: bool = True,
) -> Figure:
    """A figure from runs of a command and of its baseline: median seconds, or with `count`
    (items each run handles) a rate; with `cpu`, also the ratio by CPU time."""
    if count is None:
        values = median_seconds(measured), median_seconds(baseline)
    else:
        values = count / median_seconds(measured), count / median_seconds(baseline)
    by_cpu = cpu_ratio(measured, baseline, rate=count is not None) if cpu else None
    return Figure(key, what, unit, *values, baseline_what, goal, cpu_ratio=by_cpu)


def amount(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    number = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{number} {unit}".strip()


HEADER = ["#", "what", "measured", "baseline", "ratio", "ratio by CPU time", "goal", "met?"]


def text_table(figures: Sequence[Figure]) -> str:
    rows = [HEADER, *(figure.cells(markdown=False) for figure in figures)]
    widths = [min(max(len(row[column]) for row in rows), 60) for column in range(len(HEADER))]
    return "\n".join("  ".join(cell[:60].ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def markdown_table(figures: Sequence[Figure]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *(figure.cells(markdown=True) for figure in figures)]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)


# ---- the machine ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on: they mean little without it."""
    uname = os.uname()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{uname.sysname} {uname.release} {uname.machine}",
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "Python": platform.python_version(),
        "SQLAlchemy": _version("sqlalchemy"),
        "pydantic / argon2-cffi / PyJWT": " / ".join(_version(name) for name in ("pydantic", "argon2-cffi", "pyjwt")),
        "load average at start (1, 5, 15 min)": load,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except Exception:
        return "not installed"


def describe(error: BaseException) -> str:
    return str(error) if isinstance(error, StepFailed) else f"{type(error).__name__}: {error}"
