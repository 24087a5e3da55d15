"""Tokens and the key ring against an attacker: the hostile cases test_tokens.py and
test_keyring.py do not already hold, and the defects they found.

Each refusal is asserted exactly: its exit code, nothing on stdout, and one
`usermgr: error:` line on stderr (so no traceback and no "(a bug)").
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import (
    HANG_TIMEOUT,
    USERMGR,
    Runner,
    bearer,
    create_user,
    login,
    process_env,
    run_usermgr,
    uid_of,
    usermgr_bytes,
)
from usermgr import api, keyring, tokens
from usermgr.config import load_settings
from usermgr.errors import ConfigurationError

ISSUER = "usermgr"
UID = str(uuid.UUID(int=1))
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}


# ---- helpers -----------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(now: int, **changes: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "sub": UID, "email": "ada@example.com", "roles": [], "iat": now, "exp": now + 600}
    return {**base, "jti": uuid.uuid4().hex, "ver": 0, **changes}


def signed_text(key: keyring.RingKey, header: str, payload: str) -> str:
    """A token signed by `key` over exactly these JSON texts (duplicate members, numbers
    PyJWT would not write)."""
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    return f"{signing_input}.{b64url(key.signer.Algorithm.sign(signing_input.encode(), key.signer.key))}"


def signed(key: keyring.RingKey, payload: dict[str, Any], **header: Any) -> str:
    return signed_text(key, json.dumps({"alg": key.alg, "kid": key.kid, "typ": "JWT", **header}), json.dumps(payload))


def refused(result: Any, code: int) -> str:
    """Exit `code`, nothing on stdout, exactly one `usermgr: error:` line on stderr; that line."""
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert exit_code == code, (exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usermgr: error: "), result.stderr
    assert "(a bug" not in lines[0]
    line: str = lines[0]
    return line


@pytest.fixture
def ring_file(tmp_path: Path) -> Path:
    """A ring with one key of each algorithm: ES256 active, then HS256, EdDSA and RS256 next."""
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "ES256")
    for alg in ("HS256", "EdDSA", "RS256"):
        keyring.change_ring(path, None, keyring.add_key(alg))
    return path


@pytest.fixture
def offline(tmp_path: Path, ring_file: Path) -> Runner:
    """`usermgr` in process with the ring and a database that does not exist."""
    return Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent" / "users.db"), "USERMGR_KEY_FILE": str(ring_file)})


# ---- a ring key without its private half: it verifies, it never signs ----------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_an_active_key_without_its_private_half_refuses_to_sign_before_anything_is_recorded(
    run: Runner, tmp_path: Path, alg: str
) -> None:
    """A public JWK pasted into the ring as the active key: `login` used to check the password,
    record the login, then fail with an AttributeError (exit 1, "a bug"; a 500 in the API)."""
    path = tmp_path / "public-only.key"
    assert tokens.create_key_file(path, "ES256")
    keyring.change_ring(path, None, keyring.rotate_key(alg))
    settings = load_settings(key_file=str(path))
    before = tokens.issue_token(settings, subject=UID, email="ada@example.com", roles=[], token_version=0, ttl=600)
    ring = json.loads(path.read_text())
    active = next(key for key in ring["keys"] if key["state"] == "active")
    for member in ("d", "p", "q", "dp", "dq", "qi"):
        active.pop(member, None)
    path.write_text(json.dumps(ring))

    with pytest.raises(ConfigurationError) as unusable:
        tokens.signing_key(load_settings(key_file=str(path)))
    assert str(unusable.value) == (
        f"key {active['kid']!r} has no private half: it verifies tokens but cannot sign them;"
        " make a key that can sign active (`usermgr keys rotate`)"
    )
    create_user(run, "ada@example.com")
    line = refused(login(run, "ada@example.com", env={"USERMGR_KEY_FILE": str(path)}), 2)
    assert line == f"usermgr: error: {unusable.value}"
    audit = run("audit", "--action", "login.success", "-o", "json")
    assert json.loads(audit.stdout) == [], "nothing was recorded"
    verified = run("verify", before, "-o", "email", env={"USERMGR_KEY_FILE": str(path)})
    assert (verified.exit_code, verified.stdout) == (0, "ada@example.com\n"), "its tokens still verify"


# ---- claims of the wrong JSON type: malformed, even when the signature is good -------------------

WRONG_TYPES: dict[str, dict[str, Any]] = {
    # PyJWT reads a NumericDate with int(): "1700000000" and true were taken as times
    "exp-a-numeric-string": {"exp": "{later}"},
    "iat-a-numeric-string": {"iat": "{now}"},
    "nbf-a-numeric-string": {"nbf": "0"},
    "iat-true": {"iat": True},
    "nbf-false": {"nbf": False},
    # true == 1: a version `true` passed --check-db for a user at token version 1
    "ver-true": {"ver": True},
    "ver-false": {"ver": False},
    # `-o email` printed ['a@b'] or 5 as the email
    "email-a-number": {"email": 5},
    "email-a-list": {"email": ["ada@example.com"]},
    "email-an-object": {"email": {"address": "ada@example.com"}},
    "email-null": {"email": None},
    "roles-holding-a-number": {"roles": [1]},
    "roles-holding-null": {"roles": [None]},
    "roles-holding-a-list": {"roles": [["admin"]]},
}


@pytest.mark.parametrize("case", WRONG_TYPES, ids=list(WRONG_TYPES))
def test_a_claim_of_the_wrong_type_is_malformed(offline: Runner, ring_file: Path, case: str) -> None:
    now = int(time.time())
    changes = {
        name: value.format(now=now, later=now + 600) if isinstance(value, str) else value
        for name, value in WRONG_TYPES[case].items()
    }
    key = keyring.load_ring(ring_file, None).active
    token = signed(key, claims(now, **changes))
    for args in ((token,), (token, "-o", "email"), (token, "--role", "admin")):
        assert refused(offline("verify", *args), 7) == "usermgr: error: token invalid: malformed"
    streamed = offline("verify", "-", input=f"{token}\n")
    assert streamed.exit_code == 7
    assert json.loads(streamed.stdout)["reason"] == "token invalid: malformed"


# ---- a ring file reached through a symlink -------------------------------------------------------


def test_a_symlinked_ring_is_changed_where_it_lives_and_the_link_stays(tmp_path: Path) -> None:
    """A key file mounted as a symlink (a secrets directory, a shared volume): a `keys` change
    used to replace the link by a new file beside it, so the ring it points to, the one other
    hosts read, never saw the new key."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "config").mkdir()
    real = tmp_path / "secrets" / "ring.key"
    assert tokens.create_key_file(real, "ES256")
    link = tmp_path / "config" / "ring.key"
    link.symlink_to(real)
    (added,) = keyring.change_ring(link, None, keyring.add_key("EdDSA"))
    assert link.is_symlink() and link.resolve() == real
    assert [key["kid"] for key in json.loads(real.read_text())["keys"]][1] == added.kid
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(path.name for path in (tmp_path / "config").iterdir()) == ["ring.key"]
    assert sorted(path.name for path in (tmp_path / "secrets").iterdir()) == ["ring.key"]
    assert keyring.load_ring(link, None).get(added.kid).alg == "EdDSA"


@pytest.mark.e2e
def test_keys_rotate_racing_itself_loses_no_key_and_keeps_the_file_private(env: dict[str, str], tmp_path: Path) -> None:
    """Two `keys rotate` processes at once: both keys land (the directory lock serializes the
    read-change-write), exactly one is active, and the file stays a private, whole ring."""
    key_file = tmp_path / "race" / "ring.key"
    key_file.parent.mkdir()
    ring = {**env, "USERMGR_KEY_FILE": str(key_file), "USERMGR_TOKEN_ALGORITHM": "ES256"}
    assert run_usermgr("init", env=ring).returncode == 0
    (first,) = keyring.load_ring(key_file, None).keys
    racers = [
        subprocess.Popen(
            [str(USERMGR), "keys", "rotate", "--alg", alg],
            env=process_env(ring),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for alg in ("EdDSA", "RS256")
    ]
    outputs = [racer.communicate(timeout=HANG_TIMEOUT) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    new_kids = {stdout.strip() for stdout, _ in outputs}
    keys = json.loads(key_file.read_text())["keys"]
    assert {key["kid"] for key in keys} == {first.kid, *new_kids}
    assert sorted(key["state"] for key in keys) == ["active", "retiring", "retiring"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(path.name for path in key_file.parent.iterdir()) == ["ring.key"]


def test_ring_changes_racing_in_threads_each_land(tmp_path: Path) -> None:
    """The same race, with each change held open between its read and its write (a sleep
    inside the edit): without the directory lock every racer would write back the ring it
    read and all but one new key would be lost."""
    import threading

    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "HS256")
    start = threading.Barrier(6)
    added: list[str] = []

    def slow_add(ring: keyring.Ring) -> tuple[keyring.Ring, list[keyring.KeyChange]]:
        time.sleep(0.05)
        return keyring.add_key("HS256")(ring)

    def racer() -> None:
        start.wait()
        added.extend(change.kid for change in keyring.change_ring(path, None, slow_add))

    threads = [threading.Thread(target=racer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kids = [key.kid for key in keyring.load_ring(path, None).keys]
    assert len(kids) == 7 and set(kids[1:]) == set(added)


# ---- a "public" JWK Set that holds private key material ------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_a_jwk_set_holding_a_private_key_is_refused_not_used(tmp_path: Path, ring_file: Path, alg: str) -> None:
    """`--jwks` with the ring's private JWKs pasted in (the JWK Set a verifier was given leaks
    the signing key): it was used quietly, as if public; now exit 2, naming the members."""
    key = next(key for key in keyring.load_ring(ring_file, None).keys if key.alg == alg)
    leaked = tmp_path / "jwks.json"
    leaked.write_text(json.dumps({"keys": [key.public_jwk, {**key.jwk, "kid": "leaked"}]}))
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(tmp_path / "none")})
    token = signed(key, claims(int(time.time())))
    line = refused(runner("verify", "--jwks", str(leaked), token), 2)
    members = "d" if alg != "RS256" else "d, dp, dq, p, q, qi"
    assert line == (
        f"usermgr: error: JWK Set {leaked}: key number 2 holds private key material ({members}),"
        " which a public set must not hold"
    )
    assert key.jwk["d"] not in line


# ---- `verify` whose reader went away: the exit code still answers for every token ------------------


def _verify_into_a_closed_pipe(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The installed `usermgr verify` writing to a pipe nobody reads (its read end closed
    before the process starts, so the first write fails, as after `| head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [str(USERMGR), "verify", *args],
            input=stdin,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=process_env(env),
            text=True,
            timeout=HANG_TIMEOUT,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    ("args", "lines", "code"),
    [
        (("-",), ["good", "not-a-token"], 7),
        (("-",), ["not-a-token"], 7),
        (("-", "--role", "admin"), ["good", "good"], 8),
        (("-",), ["good", "good"], 0),
        (("good", "not-a-token"), [], 7),
        (("good",), [], 0),
    ],
    ids=["stream-good-then-bad", "stream-bad", "stream-without-the-role", "stream-good", "args-good-then-bad", "good"],
)
def test_verify_into_a_closed_pipe_still_exits_with_the_verdict(
    tmp_path: Path, ring_file: Path, args: tuple[str, ...], lines: list[str], code: int
) -> None:
    """`verify` whose reader left (`| head -1`, `| grep -q`) exited 0 at its first write:
    tokens not yet checked, invalid ones included, passed as valid. It now checks every
    token with nowhere to write, and exits with their verdict."""
    settings = load_settings(key_file=str(ring_file))
    good = tokens.issue_token(settings, subject=UID, email="ada@example.com", roles=[], token_version=0, ttl=600)
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(ring_file)}
    stdin = "".join(f"{good if line == 'good' else line}\n" for line in lines)
    result = _verify_into_a_closed_pipe(env, *(good if arg == "good" else arg for arg in args), stdin=stdin)
    assert result.returncode == code, result.stderr
    expected = ["usermgr: error: token invalid: malformed"] if args[0] == "good" and code else []
    assert result.stderr.splitlines() == expected


# ---- online: the database and the API read the same claims -------------------------------------------


def test_a_version_of_true_never_passes_for_a_user_at_token_version_1(
    run: Runner, client: TestClient, key_file: Path
) -> None:
    """`ver: true` equalled token version 1 in the holder check (true == 1): a token that
    usermgr never issues passed `verify --check-db` and the API. Now malformed everywhere."""
    create_user(run, "ada@example.com")
    assert run("revoke-tokens", "ada@example.com").exit_code == 0  # token version 0 -> 1
    key = keyring.load_ring(key_file, None).active
    now = int(time.time())
    uid = uid_of(run, "ada@example.com")
    honest, forged = (signed(key, claims(now, sub=uid, ver=version)) for version in (1, True))
    assert run("verify", honest, "--check-db", "-o", "email").stdout == "ada@example.com\n"
    assert refused(run("verify", forged, "--check-db"), 7) == "usermgr: error: token invalid: malformed"
    assert client.get("/users/me", headers=bearer(honest)).status_code == 200
    answer = client.get("/users/me", headers=bearer(forged))
    assert (answer.status_code, answer.json()) == (401, {"detail": "token invalid: malformed"})


def test_the_jwks_route_publishes_no_private_member_and_no_secret_for_any_algorithm(
    client: TestClient, key_file: Path
) -> None:
    for alg in ("HS256", "EdDSA", "ES256", "RS256"):
        keyring.change_ring(key_file, None, keyring.add_key(alg))
    ring = keyring.load_ring(key_file, None)
    answer = client.get(api.JWKS_PATH)
    published = answer.json()["keys"]
    assert [(key["kid"], key["alg"]) for key in published] == [
        (key.kid, key.alg) for key in ring.keys if key.alg in ("EdDSA", "ES256", "RS256")
    ]
    assert not [key for key in published if set(key) & PRIVATE_MEMBERS]
    secrets_ = [str(key.jwk[name]) for key in ring.keys for name in PRIVATE_MEMBERS & set(key.jwk)]
    assert len(secrets_) == 2 + 1 + 1 + 6, "two HS256 secrets, an EdDSA and an ES256 d, RSA's six"
    assert not [value for value in secrets_ if value in answer.text]


# ---- the hostile-token corpus test_tokens.py does not hold ---------------------------------------------


def _hmac(key_text: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """HS256 by hand with any bytes as the secret (PyJWT refuses a PEM or a JWK as one)."""
    import hashlib
    import hmac

    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(hmac.new(key_text, signing_input.encode(), hashlib.sha256).digest())}"


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}."


def _with_raw_claim(key: keyring.RingKey, now: int, name: str, json_text: str) -> str:
    """A claim whose JSON text PyJWT would never write (1e400, NaN, a 5000-digit number)."""
    payload = json.dumps({k: v for k, v in claims(now).items() if k != name})[:-1] + f', "{name}": {json_text}}}'
    return signed_text(key, json.dumps({"alg": key.alg, "kid": key.kid}), payload)


Keys = dict[str, keyring.RingKey]
CORPUS: dict[str, tuple[Any, str]] = {
    "hs256-keyed-with-the-es256-public-pem": (
        lambda k, now: _hmac(k["ES256"].public_pem().encode(), {"alg": "HS256", "kid": k["ES256"].kid}, claims(now)),
        "algorithm not allowed",
    ),
    "hs256-keyed-with-the-eddsa-public-jwk-text": (
        lambda k, now: _hmac(
            json.dumps(k["EdDSA"].public_jwk).encode(), {"alg": "HS256", "kid": k["EdDSA"].kid}, claims(now)
        ),
        "algorithm not allowed",
    ),
    "hs256-keyed-with-the-es256-public-jwk-text": (
        lambda k, now: _hmac(
            json.dumps(k["ES256"].public_jwk).encode(), {"alg": "HS256", "kid": k["ES256"].kid}, claims(now)
        ),
        "algorithm not allowed",
    ),
    "alg-None": (
        lambda k, now: _unsigned({"alg": "None", "kid": k["ES256"].kid}, claims(now)),
        "algorithm not allowed",
    ),
    "alg-NONE": (
        lambda k, now: _unsigned({"alg": "NONE", "kid": k["ES256"].kid}, claims(now)),
        "algorithm not allowed",
    ),
    "alg-empty": (lambda k, now: _unsigned({"alg": "", "kid": k["ES256"].kid}, claims(now)), "algorithm not allowed"),
    "alg-none-under-the-hs256-kid": (
        lambda k, now: _unsigned({"alg": "none", "kid": k["HS256"].kid}, claims(now)),
        "algorithm not allowed",
    ),
    "hs384-under-the-hs256-kid-with-its-secret": (
        lambda k, now: _hmac_as(k["HS256"], "HS384", now),
        "algorithm not allowed",
    ),
    "es384-under-the-es256-kid": (
        lambda k, now: _unsigned({"alg": "ES384", "kid": k["ES256"].kid}, claims(now)) + "AAAA",
        "algorithm not allowed",
    ),
    "ps256-under-the-rs256-kid": (
        lambda k, now: _unsigned({"alg": "PS256", "kid": k["RS256"].kid}, claims(now)) + "AAAA",
        "algorithm not allowed",
    ),
    "eddsa-signed-under-the-hs256-kid": (
        lambda k, now: signed_text(
            k["EdDSA"], json.dumps({"alg": "EdDSA", "kid": k["HS256"].kid}), json.dumps(claims(now))
        ),
        "algorithm not allowed",
    ),
    "kid-a-number": (lambda k, now: _kid(k, 7), "malformed"),
    "kid-an-object": (lambda k, now: _kid(k, {"kid": k["ES256"].kid}), "malformed"),
    "kid-true": (lambda k, now: _kid(k, True), "malformed"),
    "kid-null": (lambda k, now: _kid(k, None), "unknown key"),
    "kid-empty": (lambda k, now: _kid(k, ""), "unknown key"),
    "kid-with-a-nul": (lambda k, now: _kid(k, k["ES256"].kid + "\x00"), "unknown key"),
    "kid-of-10000-characters": (lambda k, now: _kid(k, "k" * 10_000), "unknown key"),
    "kid-etc-passwd": (lambda k, now: _kid(k, "../../etc/passwd"), "unknown key"),
    "x5c-of-another-key-under-our-kid": (
        lambda k, now: signed(_attacker(), claims(now), kid=k["ES256"].kid, x5c=[_attacker().public_pem()]),
        "bad signature",
    ),
    "crit-naming-an-unknown-extension": (lambda k, now: signed(k["ES256"], claims(now), crit=["exp"]), "malformed"),
    "crit-empty": (lambda k, now: signed(k["ES256"], claims(now), crit=[]), "malformed"),
    "crit-not-a-list": (lambda k, now: signed(k["ES256"], claims(now), crit="b64"), "malformed"),
    "b64-false-without-crit": (lambda k, now: signed(k["ES256"], claims(now), b64=False), "malformed"),
    "b64-false-with-crit": (lambda k, now: signed(k["ES256"], claims(now), b64=False, crit=["b64"]), "malformed"),
    "compact-jwe-of-5-parts": (
        lambda k, now: (
            b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": k["RS256"].kid}).encode())
            + ".AAAA.AAAA.AAAA.AAAA"
        ),
        "malformed",
    ),
    "duplicate-kid-the-first-naming-the-signer": (
        lambda k, now: signed_text(
            k["ES256"],
            f'{{"alg": "ES256", "kid": "{k["ES256"].kid}", "kid": "{k["EdDSA"].kid}"}}',
            json.dumps(claims(now)),
        ),
        "algorithm not allowed",  # the key lookup and PyJWT both read the last member: never two answers
    ),
    "zero-width-space-in-front": (lambda k, now: "\u200b" + signed(k["ES256"], claims(now)), "malformed"),
    "standard-base64-alphabet": (
        lambda k, now: _std_alphabet(signed(k["ES256"], claims(now, email="a>>>?@example.com"))),
        "malformed",
    ),
    "padding-on-the-signature": (lambda k, now: signed(k["ES256"], claims(now)) + "=", "malformed"),
    "fullwidth-dot": (lambda k, now: signed(k["ES256"], claims(now)).replace(".", "\uff0e", 1), "malformed"),
    "exp-1e400": (lambda k, now: _with_raw_claim(k["ES256"], now, "exp", "1e400"), "malformed"),
    "exp-nan": (lambda k, now: _with_raw_claim(k["ES256"], now, "exp", "NaN"), "malformed"),
    "iat-minus-1e400": (lambda k, now: _with_raw_claim(k["ES256"], now, "iat", "-1e400"), "malformed"),
    "exp-negative": (lambda k, now: signed(k["ES256"], claims(now, exp=-1)), "expired"),
    "exp-true": (lambda k, now: signed(k["ES256"], claims(now, exp=True)), "expired"),
    "exp-a-list": (lambda k, now: signed(k["ES256"], claims(now, exp=[now + 600])), "malformed"),
    "a-claim-of-5000-digits": (lambda k, now: _with_raw_claim(k["ES256"], now, "x", "9" * 5000), "malformed"),
    "header-nested-5000-deep": (
        lambda k, now: signed_text(k["ES256"], "[" * 5000 + "]" * 5000, json.dumps(claims(now))),
        "malformed",
    ),
}


def _kid(keys: Keys, kid: Any) -> str:
    return signed_text(keys["ES256"], json.dumps({"alg": "ES256", "kid": kid}), json.dumps(claims(int(time.time()))))


def _hmac_as(key: keyring.RingKey, alg: str, now: int) -> str:
    import jwt

    return jwt.encode(claims(now), key.signer.key, algorithm=alg, headers={"kid": key.kid})


def _attacker() -> keyring.RingKey:
    jwk = keyring.new_jwk("ES256")
    return keyring.RingKey(kid=jwk["kid"], alg="ES256", state="active", created="", jwk=jwk)


def _std_alphabet(token: str) -> str:
    changed = token.replace("-", "+").replace("_", "/")
    assert changed != token, "the token holds a base64url-only character"
    return changed


@pytest.mark.parametrize("case", CORPUS, ids=list(CORPUS))
def test_a_hostile_token_is_one_line_and_exit_7(offline: Runner, ring_file: Path, case: str) -> None:
    keys = {key.alg: key for key in keyring.load_ring(ring_file, None).keys}
    mint, reason = CORPUS[case]
    token = mint(keys, int(time.time()))
    assert refused(offline("verify", token), 7) == f"usermgr: error: token invalid: {reason}"
    streamed = offline("verify", "-", input=f"{token}\n")
    assert (streamed.exit_code, json.loads(streamed.stdout)["reason"]) == (7, f"token invalid: {reason}")


def test_headers_that_point_elsewhere_are_ignored_and_a_far_exp_is_printed_as_it_is(
    offline: Runner, ring_file: Path
) -> None:
    """jku, x5u, x5c and jwk are neither fetched nor trusted: the kid's key alone decides, so
    our own signature passes with them (nothing listens at 127.0.0.1:9) and another's does
    not (test_tokens.py). An exp past the year 9999 is a number like any other."""
    key = keyring.load_ring(ring_file, None).active
    now = int(time.time())
    pointing = signed(
        key,
        claims(now),
        jku="http://127.0.0.1:9/jwks.json",
        x5u="http://127.0.0.1:9/cert.pem",
        x5c=["MIIB"],
        jwk=_attacker().public_jwk,
    )
    assert offline("verify", pointing, "-o", "email").stdout == "ada@example.com\n"
    far = signed(key, claims(now, exp=253_402_300_800 + 86_400))
    for fmt in ("json", "table", "csv"):
        result = offline("verify", far, "-o", fmt)
        assert (result.exit_code, result.stderr) == (0, ""), fmt
        assert "253402387200" in result.stdout, fmt
    padded = offline("verify", "\u00a0\t" + signed(key, claims(now)) + "\u2003\n", "-o", "email")
    assert padded.stdout == "ada@example.com\n", "white space around a token, Unicode's too, is not part of it"


def test_the_stream_answers_every_line_whatever_its_bytes(tmp_path: Path, ring_file: Path) -> None:
    """Binary garbage and bytes that are not UTF-8, CRLF line ends, an empty line, a 10 MB
    line and a last line without its newline: one result each, in order, and exit 7."""
    settings = load_settings(key_file=str(ring_file))
    good = tokens.issue_token(settings, subject=UID, email="ada@example.com", roles=[], token_version=0, ttl=600)
    lines = [b"\xff\xfe\x00\x80garbage", good.encode() + b"\r", b"", b"a" * 10_000_000, good.encode()]
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(ring_file)}
    result = usermgr_bytes("verify", "-", "-o", "jsonl", env=env, input=b"\n".join(lines))
    assert (result.returncode, result.stderr) == (7, b"")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["valid"], row["reason"]) for row in rows] == [
        (False, "token invalid: malformed"),
        (True, None),
        (False, "token invalid: malformed"),
        (False, "token invalid: malformed"),
        (True, None),
    ]
    alone = usermgr_bytes("verify", "-", env=env, input=good.encode() + b"\r\n" + good.encode())
    assert (alone.returncode, alone.stderr, len(alone.stdout.splitlines())) == (0, b"", 2)


# ---- key files that cannot be trusted -----------------------------------------------------------------


def _verify_with(tmp_path: Path, key_file: Path) -> Any:
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(key_file)})
    return runner("verify", "a.b.c")


@pytest.mark.parametrize("content", [b"", b" \n\t\n"], ids=["empty", "white-space-only"])
def test_an_empty_key_file_says_so(tmp_path: Path, content: bytes) -> None:
    """An empty key file (`: > usermgr.key`, a copy cut at zero) was "the HS256 secret is
    shorter than 32 bytes", sending the admin to make a longer secret instead of restoring."""
    path = tmp_path / "usermgr.key"
    path.write_bytes(content)
    path.chmod(0o600)
    assert refused(_verify_with(tmp_path, path), 2) == (
        f"usermgr: error: key file {path} is empty: restore it from a backup"
        " (or remove it, and `usermgr init` makes a new key)"
    )


def test_a_ring_file_saved_with_a_byte_order_mark_is_still_a_ring(tmp_path: Path, ring_file: Path) -> None:
    """An editor that saves UTF-8 with a BOM made the ring look like no JSON: it was taken
    for an HS256 secret (the whole file, private keys and all) and refused as "not a valid
    HS256 key". The ring is read as the ring; a secret keeps its bytes as they are."""
    settings = load_settings(key_file=str(ring_file))
    token = tokens.issue_token(settings, subject=UID, email="ada@example.com", roles=[], token_version=0, ttl=600)
    ring_file.write_bytes(b"\xef\xbb\xbf" + ring_file.read_bytes())
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(ring_file)})
    assert runner("verify", token, "-o", "email").stdout == "ada@example.com\n"
    assert [key.alg for key in keyring.load_ring(ring_file, None).keys] == ["ES256", "HS256", "EdDSA", "RS256"]


@pytest.mark.parametrize("case", ["directory", "dangling-symlink", "symlink", "fifo-nobody-writes-to"])
def test_a_key_file_that_is_no_plain_private_file(tmp_path: Path, ring_file: Path, case: str) -> None:
    path = tmp_path / "odd.key"
    if case == "directory":
        path.mkdir(mode=0o700)
        expected = f"Invalid value for '--key-file': File '{path}' is a directory."
    elif case == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere.key")
        expected = f"no key file at {path}: run `usermgr init` to create one, or set USERMGR_SECRET_KEY"
    elif case == "fifo-nobody-writes-to":
        os.mkfifo(path, 0o600)  # opened for reading, it used to wait for a writer forever
        expected = f"key file {path} is empty"
    else:
        path.symlink_to(ring_file)  # a symlink to a private ring is that ring
        assert _verify_with(tmp_path, path).stderr == "usermgr: error: token invalid: malformed\n"
        return
    assert refused(_verify_with(tmp_path, path), 2).startswith(f"usermgr: error: {expected}")


def test_a_key_file_from_a_pipe_with_a_slow_writer_is_read_to_its_end(tmp_path: Path, ring_file: Path) -> None:
    """`--key-file <(vault read ...)`: the key arrives after the command started; opening
    without blocking must not turn that into an empty or unreadable key file. The pipe is
    the test's own (as bash's `<(...)`, it reaches usermgr as /dev/fd/N), and the key is
    written only once usermgr waits in its read: a writer that merely sleeps first (it did,
    for a second) is no slower than a loaded machine's usermgr start, and then a read
    that does not wait passed too."""
    settings = load_settings(key_file=str(ring_file))
    token = tokens.issue_token(settings, subject=UID, email="ada@example.com", roles=[], token_version=0, ttl=600)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as writer:
        try:
            process = subprocess.Popen(
                [str(USERMGR), "--key-file", f"/dev/fd/{read_end}", "verify", token, "-o", "email"],
                env=process_env({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db")}),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=[read_end],
            )
        finally:
            os.close(read_end)
        _wait_until_waiting_on_a_pipe(process)
        writer.write(ring_file.read_bytes())
    stdout, stderr = process.communicate(timeout=HANG_TIMEOUT)
    assert (process.returncode, stdout, stderr) == (0, "ada@example.com\n", "")


def _wait_until_waiting_on_a_pipe(process: subprocess.Popen[str]) -> None:
    """Until `process` sleeps in a read of a pipe (Linux: /proc/PID/wchan; its standard input
    is /dev/null, so the pipe is the key's); fail if it ends first: it did not wait for its key."""
    wchan = Path(f"/proc/{process.pid}/wchan")
    deadline = time.monotonic() + HANG_TIMEOUT  # a guard against a hang only
    while not any(name in wchan.read_text() for name in ("pipe_read", "pipe_wait")):
        assert process.poll() is None, f"usermgr did not wait for the key: {process.communicate()}"
        assert time.monotonic() < deadline, "usermgr never waited on the key's pipe"
        time.sleep(0.01)


def test_a_key_file_that_is_a_symlink_loop_is_a_configuration_error_for_every_command(tmp_path: Path) -> None:
    loop = tmp_path / "loop.key"
    loop.symlink_to(loop)
    expected = f"cannot read key file {loop}: Too many levels of symbolic links"
    for read in (
        lambda: keyring.load_ring(loop, None),
        lambda: keyring.change_ring(loop, None, keyring.add_key("HS256")),
    ):
        with pytest.raises(ConfigurationError) as refused_:
            read()
        assert str(refused_.value) == expected


@pytest.mark.parametrize("option", ["--key-file", "--public-key", "--jwks"])
@pytest.mark.parametrize("case", ["huge-file", "endless-pipe"])
def test_key_material_larger_than_any_key_is_refused_not_read_into_memory(
    tmp_path: Path, ring_file: Path, option: str, case: str
) -> None:
    """A wrong path to a multi-gigabyte file, or `<(yes)`, was read whole (out of memory, or
    never ending): every key source stops after 1 MiB with a one-line configuration error."""
    huge = tmp_path / "huge"
    with huge.open("wb") as handle:  # sparse: 2 GiB of zeros that take no disk
        handle.truncate(2 << 30)
    huge.chmod(0o600)
    source = {"--key-file": "key file", "--public-key": "public key", "--jwks": "JWK Set"}[option]
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(ring_file)}
    where = '"$KEY"' if case == "huge-file" else "<(yes)"
    if option == "--key-file":
        script = f'"$USERMGR" --key-file {where} verify "$TOKEN"'
    else:
        script = f'"$USERMGR" verify {option} {where} "$TOKEN"'
    result = subprocess.run(
        ["bash", "-c", script],
        env=process_env({**env, "USERMGR": str(USERMGR), "KEY": str(huge), "TOKEN": "a.b.c"}),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    message = refused(result, 2)
    assert message.startswith(f"usermgr: error: {source} ")
    assert message.endswith("holds more than 1 MiB, which no key does: is it the right file?")


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--public-key", "public key {path} is not a PEM public key usermgr verifies with"),
        ("--jwks", "JWK Set {path} is not JSON"),
    ],
)
def test_a_public_key_pipe_nobody_writes_to_is_refused_not_waited_on(
    offline: Runner, tmp_path: Path, option: str, expected: str
) -> None:
    path = tmp_path / "key.pipe"
    os.mkfifo(path, 0o600)  # read_bytes() waited for a writer forever
    message = refused(offline("verify", option, str(path), "a.b.c"), 2)
    assert message.startswith("usermgr: error: " + expected.format(path=path))
