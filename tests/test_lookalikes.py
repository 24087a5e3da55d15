"""An email that reads as an existing user's is refused (Unicode confusables), on every path."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.conftest import PASSWORD, Runner, create_user, emails, error_line

CYRILLIC_A = "\u0430"
LOOKALIKES = [f"{CYRILLIC_A}da@example.com", f"ada@ex{CYRILLIC_A}mple.com", "\u0391DA@example.com"]  # Greek Alpha


@pytest.mark.parametrize("email", LOOKALIKES)
def test_create_refuses_a_lookalike_of_an_existing_email(run: Runner, email: str) -> None:
    create_user(run, "ada@example.com", password=None)
    result = run("create", "--email", email, "--no-password")
    assert result.exit_code == 5
    assert "looks like the existing user 'ada@example.com'" in result.stderr
    assert emails(run) == ["ada@example.com"]


def test_the_refusal_names_both_emails_and_what_to_do(run: Runner) -> None:
    """The exact line, for one email (no line number) and for an import's row (its line)."""
    create_user(run, "ada@example.com", password=None)
    reason = f"'{LOOKALIKES[0]}' looks like the existing user 'ada@example.com' (letters from another script)"
    created = run("create", "--email", LOOKALIKES[0], "--no-password")
    assert error_line(created, 5) == f"usermgr: error: {reason}; use a different email"
    rows = json.dumps({"email": "cy@example.com"}) + "\n" + json.dumps({"email": LOOKALIKES[0]}) + "\n"
    imported = run("import", "-", "--format", "jsonl", input=rows)
    assert error_line(imported, 5) == f"usermgr: error: line 2: {reason}; use a different email"
    assert emails(run) == ["ada@example.com"]


def test_update_and_import_refuse_a_lookalike(run: Runner) -> None:
    create_user(run, "ada@example.com", password=None)
    create_user(run, "bob@example.com", password=None)
    update = run("update", "bob@example.com", "--email", LOOKALIKES[0])
    assert update.exit_code == 5
    rows = json.dumps({"email": "cy@example.com"}) + "\n" + json.dumps({"email": LOOKALIKES[1]}) + "\n"
    imported = run("import", "-", "--format", "jsonl", input=rows)
    assert imported.exit_code == 5
    assert imported.stderr.startswith("usermgr: error: line 2: ")
    assert emails(run) == ["ada@example.com", "bob@example.com"]


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["import", "dry run"])
def test_import_refuses_a_lookalike_of_an_earlier_row_of_the_same_input(run: Runner, dry_run: list[str]) -> None:
    """The earlier row is not in the database yet (rows are written a chunk at a time), and
    still `create` would refuse the second email once the first exists: so must import."""
    rows = json.dumps({"email": "ada@example.com"}) + "\n" + json.dumps({"email": LOOKALIKES[0]}) + "\n"
    imported = run("import", "-", "--format", "jsonl", *dry_run, input=rows)
    reason = f"'{LOOKALIKES[0]}' looks like the existing user 'ada@example.com' (letters from another script)"
    assert error_line(imported, 5) == f"usermgr: error: line 2: {reason}; use a different email"
    assert emails(run) == []


def test_signup_refuses_a_lookalike(run: Runner, client: TestClient) -> None:
    create_user(run, "ada@example.com", password=None)
    response = client.post("/auth/signup", json={"email": LOOKALIKES[0], "password": PASSWORD})
    assert response.status_code == 409


@pytest.mark.parametrize("email", ["zo\u00eb@example.com", "\u0438\u0432\u0430\u043d@example.com", "ada@example.org"])
def test_non_latin_emails_that_mimic_nobody_are_welcome(run: Runner, email: str) -> None:
    create_user(run, "ada@example.com", password=None)
    result = run("create", "--email", email, "--no-password")
    assert (result.exit_code, result.stderr) == (0, "")
