"""The user record's shape is declared once: adding a field touches four places and no other.

The test follows the README's "Add a field" recipe on a copy of the package (the column in
models.py, a migration, contract.USER_RECORD, schemas.ImportRow) and runs that copy as its
own processes, on both backends: the new field must then be in every output (create, show,
list in json, jsonl and csv, export, the API's user) and come back through import. A layer
that still lists the fields by hand drops the new one, and this test fails.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

import usermgr
from tests.conftest import CONTRACT_USER_FIELDS, HANG_TIMEOUT, PASSWORD, process_env
from usermgr import migrations

PHONE = "020 7946 0000"
FIELDS = [*CONTRACT_USER_FIELDS, "phone"]


def _insert(path: Path, anchor: str, text: str, *, after: bool = False, start: str = "") -> None:
    """Put `text` before (or after) the first line that starts with `anchor`, looking from the
    line that starts with `start`; fails loudly when the code no longer has the anchor."""
    lines = path.read_text().splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.startswith(start)), None) if start else 0
    assert begin is not None, f"{path.name}: no line starts with {start!r}"
    at = next((i for i in range(begin, len(lines)) if lines[i].startswith(anchor)), None)
    assert at is not None, f"{path.name}: no line starts with {anchor!r} after {start!r}"
    lines.insert(at + 1 if after else at, text)
    path.write_text("".join(lines))


def add_phone_field(package: Path) -> None:
    """The README's recipe, applied to a copy of the package: these four files, nothing else."""
    _insert(package / "contract.py", "}", '    "phone": str | None,\n', start="USER_RECORD")
    _insert(package / "models.py", "    roles: Mapped[", "    phone: Mapped[str | None] = mapped_column(String(40))\n")
    _insert(
        package / "schemas.py",
        "    model_config",
        "    phone: str | None = None\n",
        after=True,
        start="class ImportRow",
    )
    head = ScriptDirectory.from_config(migrations.alembic_config(create_engine("sqlite://"))).get_current_head()
    (package / "migrations" / "versions" / "9999_phone.py").write_text(
        textwrap.dedent(f'''\
            """A phone number for every user."""

            import sqlalchemy as sa
            from alembic import op

            revision = "9999"
            down_revision = "{head}"


            def upgrade() -> None:
                op.add_column("users", sa.Column("phone", sa.String(40), nullable=True))


            def downgrade() -> None:
                with op.batch_alter_table("users") as batch:
                    batch.drop_column("phone")
            ''')
    )


@pytest.fixture(scope="module")
def with_phone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a copy of the package with the `phone` field added."""
    root = tmp_path_factory.mktemp("with_phone")
    shutil.copytree(Path(usermgr.__file__).parent, root / "usermgr", ignore=shutil.ignore_patterns("__pycache__"))
    add_phone_field(root / "usermgr")
    return root


class Copy:
    """The copy of the package as its own processes, on one database."""

    def __init__(self, root: Path, db_url: str, key_file: Path) -> None:
        self.root = root
        self.env = process_env(
            {"USERMGR_DATABASE_URL": db_url, "USERMGR_KEY_FILE": str(key_file), "USERMGR_HASH_PROFILE": "test"}
        ) | {"PYTHONPATH": str(root)}

    def python(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        # The copy's own directory as the working one, so that `import usermgr` can only be the copy.
        return subprocess.run(
            [sys.executable, *args],
            input=input,
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
        )

    def __call__(self, *args: str, input: str | None = None) -> str:
        result = self.python("-m", "usermgr", *args, input=input)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout


API_RECORD = """
import json, sys
from fastapi.testclient import TestClient
from usermgr.api import create_app

with TestClient(create_app()) as client:
    answer = client.post("/auth/login", data={"username": sys.argv[1], "password": sys.argv[2]})
    token = answer.json()["access_token"]
    me = client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    print(json.dumps(me.json()))
"""


def csv_records(text: str) -> list[dict[str, Any]]:
    return list(csv.DictReader(io.StringIO(text)))


# These two run a copy of the package in processes of their own (e2e): under `make mutate` the copy
# would be of mutmut's trampolined package, outside the mutmut process that records what runs.
@pytest.mark.e2e
def test_the_copy_is_what_runs(with_phone: Path, empty_db_url: str, key_file: Path) -> None:
    found = Copy(with_phone, empty_db_url, key_file).python("-c", "import usermgr; print(usermgr.__file__)")
    assert Path(found.stdout.strip()).parent == with_phone / "usermgr"


@pytest.mark.e2e
def test_a_field_added_in_the_four_places_is_in_every_output(
    with_phone: Path, empty_db_url: str, key_file: Path, tmp_path: Path
) -> None:
    copy = Copy(with_phone, empty_db_url, key_file)
    copy("init")

    created = json.loads(
        copy("create", "--email", "ada@example.com", "--password-stdin", "-o", "json", input=f"{PASSWORD}\n")
    )
    assert list(created) == FIELDS
    assert created["phone"] is None

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"email": "bob@example.com", "phone": PHONE}) + "\n")
    copy("import", str(rows))
    assert json.loads(copy("show", "bob@example.com", "-o", "json"))["phone"] == PHONE

    listed = json.loads(copy("list", "-o", "json"))
    assert [record["phone"] for record in listed] == [None, PHONE]
    assert [list(record) for record in listed] == [FIELDS, FIELDS]
    lines = [json.loads(line) for line in copy("list", "-o", "jsonl").splitlines()]
    assert lines == listed
    as_csv = csv_records(copy("list", "-o", "csv"))
    assert [list(row) for row in as_csv] == [FIELDS, FIELDS]
    assert [row["phone"] for row in as_csv] == ["", PHONE]

    exported = copy("export", "-o", "jsonl")
    assert [json.loads(line)["phone"] for line in exported.splitlines()] == [None, PHONE]
    exported_csv = copy("export", "-o", "csv")
    assert [row["phone"] for row in csv_records(exported_csv)] == ["", PHONE]

    # An export comes back unchanged through import, into another database of the copy.
    other = Copy(with_phone, f"sqlite:///{tmp_path / 'other.db'}", key_file)
    other("init")
    (tmp_path / "export.csv").write_text(exported_csv)
    other("import", str(tmp_path / "export.csv"))
    assert other("export", "-o", "jsonl") == exported

    api = copy.python("-c", API_RECORD, "ada@example.com", PASSWORD)
    assert api.returncode == 0, api.stderr
    record = json.loads(api.stdout)
    assert list(record) == FIELDS
    assert record["phone"] is None
    assert os.environ.get("PYTHONPATH") != str(with_phone)  # the copy never leaks into this process
