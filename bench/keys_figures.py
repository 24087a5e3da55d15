"""Figures for the key ring (issues 11 and 13): `usermgr verify -` with a ring of five keys.

    11a  verify - of 10,000 tokens signed by 5 keys of a ring  vs  the same with a 1-key ring
    11b  verify - of 10,000 tokens, 1-key ring                  vs  a plain PyJWT loop, key parsed once

`python bench/keys_figures.py decode RING < TOKENS` is 11b's baseline: PyJWT alone, the ring's
active key made a PyJWK once, the same checks and the same JSON line out per token.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from harness import Figure, Goal, alternate, run, versus
from workspace import USERMGR

if TYPE_CHECKING:
    from workspace import Workspace

COUNT = 10_000
RING_SIZE = 5
RUNS = 9
"""Turns of each command (0.7 s a run). 11a's goal leaves 5%: the two rings' runs are the same
work (callgrind: 5,090.8 and 5,092.0 million instructions for 10,000 tokens), yet with 3 turns
the machine's swings read 0.87 to 1.05; the median of 9 holds still."""


def _ring(path: Path, size: int) -> list[object]:
    """A key ring of `size` HS256 keys (each rotation leaves the one before retiring); its keys."""
    from usermgr import keyring, tokens

    tokens.create_key_file(path, "HS256")
    keyring.put_in_place(path, keyring.load_ring(path, None).serialized(), 0o600, replace=True)  # a ring file
    for _ in range(size - 1):
        keyring.change_ring(path, None, keyring.rotate_key("HS256"))
    return list(keyring.load_ring(path, None).keys)


def _mint(path: Path, ring: Path, keys: list[object]) -> Path:
    """COUNT valid tokens, one a line, signed by the ring's keys in turn."""
    from usermgr import tokens
    from usermgr.config import load_settings

    settings = load_settings(database_url=str(ring.parent / "absent.db"), key_file=str(ring))
    with path.open("w", encoding="ascii") as handle:
        for n in range(1, COUNT + 1):
            token = tokens.issue_token(
                settings,
                subject=str(uuid.UUID(int=n)),
                email=f"user{n}@example.com",
                roles=["staff"],
                token_version=0,
                ttl=3600,
                key=keys[n % len(keys)],  # type: ignore[arg-type]
            )
            handle.write(token + "\n")
    return path


def keys_verify(ws: Workspace) -> list[Figure]:
    root = ws.root / "keys"
    root.mkdir(exist_ok=True)
    one, five = root / "one.key", root / "five.key"
    tokens_one = _mint(root / "tokens-1.txt", one, _ring(one, 1))
    tokens_five = _mint(root / "tokens-5.txt", five, _ring(five, RING_SIZE))

    def verify(ring: Path) -> list[str]:
        return [USERMGR, "--db", str(root / "absent.db"), "--key-file", str(ring), "verify", "-"]

    with_five, with_one, plain = alternate(
        RUNS,
        lambda _i: run(verify(five), stdin=tokens_five),
        lambda _i: run(verify(one), stdin=tokens_one),
        lambda _i: run([sys.executable, __file__, "decode", str(one)], stdin=tokens_one),
    )
    what = f"`usermgr verify -` of {COUNT:,} tokens signed by the {RING_SIZE} keys of a ring"
    ring_figure = versus(
        "11a", what, with_five, with_one, "the same with a 1-key ring", Goal(low=0.95), count=COUNT, unit="tokens/s"
    )
    plain_what = "a plain PyJWT loop, the key made a PyJWK once, same checks and output"
    plain_figure = versus(
        "11b",
        f"`usermgr verify -` of {COUNT:,} tokens, 1-key ring",
        with_one,
        plain,
        plain_what,
        Goal(low=0.95),
        count=COUNT,
        unit="tokens/s",
    )
    return [ring_figure, plain_figure]


def decode(ring_file: str) -> None:
    """11b's baseline: what `usermgr verify -` does per line, with PyJWT alone."""
    import jwt

    stored = json.loads(Path(ring_file).read_text())["keys"]
    active = next(key for key in stored if key["state"] == "active")
    key = jwt.PyJWK({"kty": active["kty"], "k": active["k"]}, algorithm=active["alg"])
    out = sys.stdout
    for line in sys.stdin:
        claims = jwt.decode(
            line.strip(),
            key,
            algorithms=[active["alg"]],
            issuer="usermgr",
            leeway=10,
            options={"require": ["exp", "iat", "iss", "sub"]},
        )
        out.write(json.dumps({"valid": True, "reason": None, "claims": claims}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["decode"]:
        decode(sys.argv[2])
