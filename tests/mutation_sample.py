"""`make mutate`: mutmut over a seeded random sample of the mutants, then the score.

A full mutmut run over the rule-holding modules takes hours on this project's 2-core machines,
so the habit is a sample: mutants are generated as `mutmut run` generates them, a seeded random
set of them is handed to `mutmut run NAME...`, and the score is computed over that set alone.
The seed is printed so that a run can be repeated exactly. The configuration (which modules,
which tests) is the [mutmut] section of setup.cfg. Run from the project's root.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mutmut.__main__ import create_mutants
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.trampoline import set_mutant_under_test
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths, walk_mutatable_files


def _mutmut_pytest_args() -> list[str]:
    """pytest's arguments for a mutant's run, as setup.cfg gives them to mutmut (one a line)."""
    config = configparser.ConfigParser()
    config.read("setup.cfg")
    return config["mutmut"]["pytest_add_cli_args"].strip().splitlines()


MUTMUT_PYTEST_ARGS = _mutmut_pytest_args()

# Statuses that count for the test suite; "no tests" and "survived" count against it.
KILLED = {"killed", "timeout", "caught by type check"}
NOT_SCORED = {"skipped", "not checked"}


def generate_mutants(max_children: int) -> None:
    """Write ./mutants exactly as the first step of `mutmut run` does."""
    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(max_children)


def results() -> dict[str, str]:
    """Every mutant's name and status, as recorded in mutants/**/*.meta."""
    statuses: dict[str, str] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        statuses.update({name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()})
    return statuses


def tests_for(name: str) -> list[str]:
    """The tests that mutmut's stats run saw reach the mutated function, fastest first."""
    mutmut = shutil.which("mutmut", path=Path(sys.executable).parent) or "mutmut"
    result = subprocess.run([mutmut, "tests-for-mutant", name], capture_output=True, text=True, check=True)
    durations = json.loads(Path("mutants/mutmut-stats.json").read_text())["duration_by_test"]
    return sorted(result.stdout.split("\n")[:-1], key=lambda test: durations.get(test, 0.0))


def recheck(name: str) -> str:
    """The status of one mutant from a plain pytest run of its tests, in a process of its own.

    mutmut 3.8 reports a mutant as "timeout" (exit 255, in no time at all) when pytest ended
    with a usage error (exit 4) rather than a failure: what a mutant that breaks the import of a
    test module causes ("found no collectors"). A fresh process tells those from a real timeout
    and from a worker's failure. The same tests pass unmutated (mutmut's clean run checks it),
    so any pytest failure (exit 1 to 4) is the mutant's doing: killed.
    """
    tests = tests_for(name)
    if not tests:
        return "no tests"
    command = [sys.executable, "-m", "pytest", "--rootdir=.", "-x", "-q", *MUTMUT_PYTEST_ARGS, *tests]
    env = {**os.environ, "MUTANT_UNDER_TEST": name}
    done = subprocess.run(command, cwd="mutants", env=env, capture_output=True, timeout=1800)
    if done.returncode == 0:
        return "survived"
    return "killed" if done.returncode in (1, 2, 3, 4) else f"error (pytest exit {done.returncode})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=200, help="mutants to run; 0 runs them all")
    parser.add_argument("--seed", type=int, default=None, help="the sample's seed (default: a fresh one)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    generate_mutants(args.max_children)
    names = sorted(results())
    sampled = 0 < args.sample < len(names)
    chosen = sorted(random.Random(seed).sample(names, args.sample)) if sampled else names
    what = f"a random sample of {len(chosen)} of {len(names)} mutants, seed {seed}" if sampled else "all mutants"
    print(f"mutate: running {what}", flush=True)

    mutmut = shutil.which("mutmut", path=Path(sys.executable).parent) or "mutmut"
    command = [mutmut, "run", "--max-children", str(args.max_children), *chosen]
    if subprocess.run(command).returncode != 0:
        print("mutate: mutmut run failed", file=sys.stderr)
        return 1

    statuses = results()
    doubtful = [name for name in chosen if statuses[name] == "timeout"]
    if doubtful:
        print(f"mutate: rechecking {len(doubtful)} mutants mutmut calls timeouts, each in a process of its own")
        with ThreadPoolExecutor(args.max_children) as pool:
            statuses.update(zip(doubtful, pool.map(recheck, doubtful), strict=True))
    counts = Counter(statuses[name] for name in chosen)
    scored = sum(n for status, n in counts.items() if status not in NOT_SCORED)
    killed = sum(n for status, n in counts.items() if status in KILLED)
    survivors = sorted(name for name in chosen if statuses[name] not in KILLED | NOT_SCORED)
    for name in survivors:
        print(f"    {name}: {statuses[name]}")
    score = 100 * killed / scored if scored else 0.0
    print(f"mutate: score {score:.1f}% ({killed} of {scored} killed; {dict(sorted(counts.items()))}) on {what}")
    print("mutate: `mutmut show NAME` prints a survivor's diff")
    return 0


if __name__ == "__main__":
    sys.exit(main())
