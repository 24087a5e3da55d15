"""`make bench`: usermgr's performance figures (issue 5), each beside a baseline measured in the same run.

Every measured thing runs as a subprocess of this script, timed here with time.perf_counter; a
figure is the median of several runs, taken in turns with its baseline (5 for start-up, the
100,000-row import and list, and figures near a narrow goal; 3 for the other big ones; 1 where a
run takes about a minute: the 200 argon2 hashes, the memory of each format), and is shown as a
ratio to that baseline, by wall time and, as a cross-check that other jobs on the machine sway
less, by CPU time: reported, never asserted. Prints the table on stdout, progress on stderr, and writes bench/RESULTS.md
(keeping its hand-written analysis at the end).

    python bench/run.py                   every figure, then RESULTS.md
    python bench/run.py --only 4,5 --keep  some figures (RESULTS.md untouched); keep bench/work/run-*
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import audit_figures
import auditidx_figures
import data
import keys_figures
import perfapi_figures
import perfcli_figures
from harness import (
    Figure,
    Goal,
    Proc,
    alternate,
    amount,
    describe,
    extra_imports,
    machine,
    markdown_table,
    median_seconds,
    peak_rss,
    progress,
    ratio_text,
    run,
    text_table,
    versus,
)
from workspace import (
    BASELINES,
    BENCH,
    PYTHON,
    SMALL_DB_USER,
    USERMGR,
    Workspace,
    commit,
    sqlite_json_command,
)

RESULTS = BENCH / "RESULTS.md"
ANALYSIS_MARKER = "<!-- Written by hand below this line; bench/run.py keeps it as it is. -->"

STARTUP_RUNS = 5
BIG_RUNS = 3
IMPORT_RUNS = 5  # the import's and list's ratios swing most with the machine's speed, and a run takes 1 to 15 s


def command(cmd: list[str], **options: Any) -> Callable[[int], Proc]:
    """A step for `alternate`: the same command every run."""
    return lambda _index: run(cmd, **options)


def startup_figure(key: str, what: str, measured: list[str], baseline_code: str, goal: Goal) -> Figure:
    """Start-up time of a quick command against Python importing what that command needs; when
    the goal is missed, the note says which imports the difference is made of."""
    baseline = [PYTHON, "-c", baseline_code]
    commands, baselines = alternate(STARTUP_RUNS, command(measured), command(baseline), warmup=True)
    figure = versus(key, what, commands, baselines, f'`python -c "{baseline_code}"`', goal)
    if figure.met is False:
        importtime = [PYTHON, "-X", "importtime"]
        figure.note = extra_imports([*importtime, *measured], [*importtime, *baseline[1:]])
    return figure


# ---- the figures --------------------------------------------------------------------------


def help_startup(ws: Workspace) -> list[Figure]:
    return [startup_figure("1a", "`usermgr --help`", [USERMGR, "--help"], "import click", Goal(high=1.5))]


def help_vs_sqlite_utils(ws: Workspace) -> list[Figure]:
    what = "`usermgr --help` vs `sqlite-utils --help`"
    tool = shutil.which("sqlite-utils")
    if tool is None:
        return [
            Figure("1b", what, baseline_what="`sqlite-utils --help`", note="sqlite-utils is not on PATH: not measured")
        ]
    ours, theirs = alternate(STARTUP_RUNS, command([USERMGR, "--help"]), command([tool, "--help"]), warmup=True)
    return [versus("1b", what, ours, theirs, "`sqlite-utils --help`", Goal(high=1, strict=True))]


def verify_startup(ws: Workspace) -> list[Figure]:
    measured = ws.usermgr(ws.small_db, "verify", ws.token)
    return [startup_figure("2", "`usermgr verify TOKEN`", measured, "import click, jwt", Goal(high=1.5))]


def show_startup(ws: Workspace) -> list[Figure]:
    measured = ws.usermgr(ws.small_db, "show", SMALL_DB_USER)
    return [startup_figure("3", "`usermgr show USER`", measured, "import click, sqlalchemy.orm", Goal(high=1.3))]


def import_rate(ws: Workspace) -> list[Figure]:
    count = 100_000
    source = data.write_csv(ws.root / "users-100k.csv", count)

    def import_once(index: int) -> Proc:
        db = ws.new_db(f"import-{index}")  # not timed: a fresh, empty database for every run
        return run(ws.usermgr(db, "import", str(source)))

    validate = command([PYTHON, BASELINES, "plain-validate", str(source)])
    imports, validations = alternate(IMPORT_RUNS, import_once, validate)
    what = f"`usermgr import` of {count:,} rows without passwords, into an empty db"
    baseline_what = "a plain pydantic model with an EmailStr field validating the same CSV rows, subprocess"
    figure = versus("4", what, imports, validations, baseline_what, Goal(low=0.8), count=count, unit="rows/s")
    figure.note = f"peak RSS of the import {peak_rss(imports):.0f} MiB"
    seconds = versus("4-s", f"{what}: seconds", imports, validations, baseline_what, Goal(high=5, on_ratio=False))
    return [figure, seconds]


def list_rate(
    ws: Workspace, key: str, db: Path, count: int, runs: int, rss_goal: Goal | None, goal: Goal
) -> list[Figure]:
    baseline, baseline_what = sqlite_json_command(db)
    listings, baselines = alternate(runs, command(ws.usermgr(db, "list", "-o", "jsonl")), command(baseline))
    what = f"`usermgr list -o jsonl` of {count:,} users > /dev/null"
    rate = versus(key, what, listings, baselines, baseline_what, goal, count=count, unit="rows/s")
    memory_what = f"peak RSS of that `usermgr list` ({count:,} users)"
    memory = Figure(f"{key}-rss", memory_what, "MiB", peak_rss(listings), peak_rss(baselines), "the same baseline's")
    memory.goal = rss_goal
    return [rate, memory]


def list_100k(ws: Workspace) -> list[Figure]:
    return list_rate(ws, "5a", ws.users_100k, 100_000, IMPORT_RUNS, None, Goal(low=0.3))


def list_1m(ws: Workspace) -> list[Figure]:
    memory = Goal(high=80, on_ratio=False, unit="MiB")
    return list_rate(ws, "5b", ws.users_1m, 1_000_000, BIG_RUNS, memory, Goal(low=0.5))


def password_import(ws: Workspace) -> list[Figure]:
    count, cores = 200, os.cpu_count() or 1
    source = data.write_csv(ws.root / "passwords-200.csv", count, with_passwords=True)
    db = ws.new_db("passwords")
    progress(
        f"  hashing {count} passwords sequentially, importing them, hashing them with {cores} threads (~1 min each)"
    )
    # The import runs between its two baselines, so that a steady drift of the machine's load
    # over these minutes favours neither side.
    sequential = run([PYTHON, BASELINES, "hash", str(source), "sequential"])
    imported = run(ws.usermgr(db, "import", str(source)))
    threads = run([PYTHON, BASELINES, "hash", str(source), "threads"])
    best, how = (sequential, "sequential") if sequential.seconds <= threads.seconds else (threads, f"{cores} threads")
    what = f"`usermgr import` of {count} plaintext passwords (real argon2id)"
    baseline_what = f"argon2-cffi `PasswordHasher()` at its defaults, {how} (the faster way)"
    goal = Goal(low=0.9)
    figure = versus("6", what, [imported], [best], baseline_what, goal, count=count, unit="hashes/s")
    figure.note = (
        f"baselines: sequential {count / sequential.seconds:.2f} hashes/s, a pool of {cores} threads"
        f" {count / threads.seconds:.2f} hashes/s; one run each, as a run takes about a minute. argon2 runs"
        " its 4 lanes on threads of its own, so CPU time counts the work done, not how it spread over the cores"
    )
    return [figure]


def verify_stream(ws: Workspace) -> list[Figure]:
    count = 10_000
    tokens = data.mint_tokens(ws.root / "tokens.txt", count, ws.small_db)
    verifying, decoding = alternate(
        BIG_RUNS,
        command(ws.usermgr(ws.small_db, "verify", "-"), stdin=tokens),
        command([PYTHON, BASELINES, "decode", str(ws.key_file)], stdin=tokens),
    )
    what = f"`usermgr verify -` of {count:,} tokens (JSON lines out)"
    baseline_what = "a plain Python loop of PyJWT `jwt.decode` with the same checks"
    goal = Goal(low=10_000, on_ratio=False, unit="tokens/s")
    return [versus("7", what, verifying, decoding, baseline_what, goal, count=count, unit="tokens/s")]


def batch_disable(ws: Workspace) -> list[Figure]:
    batch, sampled = 1000, 20
    db = ws.users_100k
    first = 1001  # user 1 is the one admin; each run disables users that no earlier run touched

    def disable_batch(index: int) -> Proc:
        start = first + index * batch
        emails = "".join(data.email(n) + "\n" for n in range(start, start + batch))
        return run(ws.usermgr(db, "disable", "-"), stdin=emails)

    batches = alternate(BIG_RUNS, disable_batch)[0]
    loop_start = first + BIG_RUNS * batch
    loop = 'usermgr=$1 db=$2; shift 2; for user; do "$usermgr" --db "$db" disable "$user" || exit; done'
    users = [data.email(n) for n in range(loop_start, loop_start + sampled)]
    shell = run(["sh", "-c", loop, "sh", USERMGR, str(db), *users])
    what = f"`usermgr disable -` of {batch:,} users (emails on stdin)"
    scaled = shell.seconds * batch / sampled
    baseline_what = f"a shell loop of `usermgr disable USER`, {sampled} calls ({scaled:.0f} s per {batch:,})"
    return [Figure("8", what, "users/s", batch / median_seconds(batches), batch / scaled, baseline_what, Goal(low=50))]


def login_timing(ws: Workspace) -> list[Figure]:
    env = {**os.environ, "USERMGR_LOCKOUT_THRESHOLD": "0"}  # ten wrong passwords must not lock the user out

    def attempt(user: str) -> Callable[[int], Proc]:
        login = ws.usermgr(ws.small_db, "login", user, "--password-stdin")
        return command(login, stdin="not-the-password\n", ok=(6,), env=env)

    unknown, wrong = alternate(10, attempt("nobody@example.com"), attempt(SMALL_DB_USER))
    what = "`usermgr login`, unknown email (exit 6), median of 10"
    baseline_what = "wrong password for a real user (exit 6), median of 10"
    return [versus("9", what, unknown, wrong, baseline_what, Goal(low=0.9, high=1.1))]


FIGURES: list[tuple[str, str, Callable[[Workspace], list[Figure]]]] = [
    ("1", "`usermgr --help` start-up", help_startup),
    ("1", "`usermgr --help` vs sqlite-utils", help_vs_sqlite_utils),
    ("2", "`usermgr verify TOKEN` start-up", verify_startup),
    ("3", "`usermgr show USER` start-up", show_startup),
    ("4", "import of 100,000 rows", import_rate),
    ("5", "list -o jsonl of 100,000 users", list_100k),
    ("5", "list -o jsonl of 1,000,000 users", list_1m),
    ("6", "import of 200 passwords", password_import),
    ("7", "verify - of 10,000 tokens", verify_stream),
    ("8", "disable - of 1,000 users", batch_disable),
    ("9", "login timing: unknown email vs wrong password", login_timing),
    ("11", "verify - with a 5-key ring, and vs plain PyJWT", keys_figures.keys_verify),
    ("api", "GET /users/me vs a bare FastAPI app", perfapi_figures.users_me),
    ("13", "last-admin rule of one user at 10k, 100k, 1M users", perfcli_figures.last_admin_rule),
    ("13", "list --role of 10 members at 10k and 1M users", perfcli_figures.list_by_role),
    ("13", "export of 1,000,000 users", perfcli_figures.export_1m),
    ("13", "memory of every format at 1,000,000 users", perfcli_figures.memory_1m),
    ("13", "import of passwords with a conflicting row", perfcli_figures.conflicting_import),
    ("12", "import of 100,000 rows, audited vs not", audit_figures.audited_import),
    ("12", "audit --user among 1,000,000 events", audit_figures.audit_by_user),
    ("12", "audit --actor and --action among 1,000,000 events", auditidx_figures.audit_by_actor_and_action),
]


# ---- running and reporting ---------------------------------------------------------------------


def measure(ws: Workspace, only: set[str] | None) -> list[Figure]:
    figures: list[Figure] = []
    for number, title, function in FIGURES:
        if only is not None and number not in only:
            continue
        progress(f"figure {number}: {title}")
        try:
            rows = function(ws)
        except Exception as error:  # one broken figure must not cost the others
            rows = [Figure(number, title, error=describe(error))]
        for row in rows:
            progress(f"  {row.key}: {' | '.join(row.cells(markdown=False)[2:])}")
            if row.error or row.note:
                progress(f"  {row.key}: {row.error or row.note}")
        figures.extend(rows)
    return figures


def report(figures: Sequence[Figure], about: dict[str, str]) -> str:
    lines = [
        "# usermgr benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); the method is in its docstring.",
        "",
    ]
    lines += ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in about.items()), ""]
    lines += ["## Figures", "", markdown_table(figures), ""]
    lines += ["## Goals missed in this run", ""]
    missed = [figure for figure in figures if figure.met is False]
    for figure in missed:
        goal, value = figure.goal, figure.judged
        assert goal is not None and value is not None
        shown = ratio_text(value) if goal.on_ratio else amount(value, goal.unit)
        lines.append(f"- **{figure.key}** {figure.what}: {shown} against `{goal}`, {goal.shortfall(value)}.")
    lines += ["- none"] if not missed else []
    notes = [f"- **{figure.key}** {figure.error or figure.note}" for figure in figures if figure.error or figure.note]
    lines += ["", "## Notes and errors", "", *(notes or ["- none"]), ""]
    return "\n".join(lines)


def kept_analysis() -> str:
    """The hand-written part of RESULTS.md: everything from the marker on."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    return text[text.index(ANALYSIS_MARKER) :] if ANALYSIS_MARKER in text else ANALYSIS_MARKER + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated figure numbers; RESULTS.md is then left alone")
    parser.add_argument("--keep", action="store_true", help="keep the work directory under bench/work/")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    about = {**machine(), "usermgr commit": commit()}
    # Measure usermgr as a wheel installs it, with its bytecode compiled: this editable checkout
    # has none, and under PYTHONDONTWRITEBYTECODE=1 every process would compile every module again
    # (a fifth of `--help`'s CPU), while the baselines' packages are compiled.
    compileall.compile_dir(BENCH.parent / "usermgr", quiet=1)
    (BENCH / "work").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH / "work"))
    progress(f"working in {root}; usermgr is {USERMGR}")
    try:
        figures = measure(Workspace(root), only)
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(text_table(figures))
    if only is None:
        RESULTS.write_text(report(figures, about) + "\n" + kept_analysis(), encoding="utf-8")
        progress(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
