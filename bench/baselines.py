"""Baselines that bench/run.py times as subprocesses: the same work without usermgr around it.

python bench/baselines.py plain-validate FILE.csv          a plain pydantic model with an EmailStr field
python bench/baselines.py hash FILE.csv sequential|threads argon2-cffi PasswordHasher() on the passwords
python bench/baselines.py decode KEY_FILE < TOKENS          PyJWT decode, one JSON line out per token
python bench/baselines.py sqlite-json DB SQL               the sqlite3 CLI's job, with python's sqlite3
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def plain_validate(path: str) -> None:
    """The same rows through a plain pydantic model with an email field, not usermgr's schema."""
    from pydantic import BaseModel, EmailStr

    class Row(BaseModel):
        email: EmailStr
        username: str | None = None
        full_name: str | None = None
        roles: list[str] = []

    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            fields = {name: value for name, value in row.items() if value != ""}
            if "roles" in fields:
                fields["roles"] = fields["roles"].split(";")
            Row.model_validate(fields)


def hash_passwords(path: str, mode: str) -> None:
    """argon2-cffi at its defaults: one after another, or a pool of os.cpu_count() threads."""
    import argon2

    hasher = argon2.PasswordHasher()
    with open(path, newline="", encoding="utf-8") as handle:
        passwords = [row["password"] for row in csv.DictReader(handle)]
    if mode == "sequential":
        for password in passwords:
            hasher.hash(password)
    else:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(hasher.hash, passwords))


def decode(key_file: str) -> None:
    """What `usermgr verify -` does per line, with PyJWT alone and the same checks."""
    import jwt

    key = Path(key_file).read_bytes().strip()
    out = sys.stdout
    for line in sys.stdin:
        claims = jwt.decode(
            line.strip(),
            key,
            algorithms=["HS256"],
            issuer="usermgr",
            leeway=10,
            options={"require": ["exp", "iat", "iss", "sub"]},
        )
        out.write(json.dumps({"valid": True, "reason": None, "claims": claims}) + "\n")


def sqlite_json(database: str, query: str) -> None:
    out = sys.stdout
    with sqlite3.connect(database) as db:
        for (line,) in db.execute(query):
            out.write(line + "\n")


COMMANDS: dict[str, Callable[..., None]] = {
    "plain-validate": plain_validate,
    "hash": hash_passwords,
    "decode": decode,
    "sqlite-json": sqlite_json,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
