"""Bearer tokens (stored hashed), OIDC JWTs checked against a JWKS file, anonymous roles
only when spelled out; 401 and 403 with a reason, and no credential in the log."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from node.config import AuthSettings
from node.roles import Role
from node.web.auth import Authenticator, NotAuthenticated
from tests.node.web.conftest import TOKENS

ISSUER, AUDIENCE = "https://idp.hospital.example/realms/radiology", "ainode"


def token(key: rsa.RSAPrivateKey, **claims: object) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "preferred_username": "dr.house",
        "realm_access": {"roles": ["reader", "offline_access"]},
        **claims,
    }
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})


def authenticator(jwks_file: Path, **extra: object) -> Authenticator:
    return Authenticator(
        AuthSettings.model_validate(
            {
                "tokens": [
                    {
                        "name": "pacs",
                        "sha256": hashlib.sha256(b"s3cret").hexdigest(),
                        "roles": ["sender"],
                    }
                ],
                "jwt": {
                    "jwks_file": str(jwks_file),
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "roles_claim": "realm_access.roles",
                },
                **extra,
            }
        )
    )


def test_tokens_and_jwts_give_their_roles(jwks_file: Path, signing_key) -> None:
    auth = authenticator(jwks_file)
    pacs = auth.authenticate("Bearer s3cret")
    assert pacs.name == "pacs" and pacs.roles == {Role.SENDER}
    doctor = auth.authenticate(f"Bearer {token(signing_key)}")
    assert doctor.name == "dr.house" and doctor.roles == {Role.READER}
    admin = auth.authenticate(f"Bearer {token(signing_key, realm_access={'roles': ['admin']})}")
    assert admin.roles == set(Role)  # an administrator may do everything


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "a bearer token is required"),
        ("Basic dXNlcjpwYXNz", "Bearer"),
        ("Bearer nope", "unknown token"),
        ("Bearer ", "Bearer"),
    ],
)
def test_missing_or_wrong_credentials_are_refused(
    jwks_file: Path, header: str | None, reason: str
) -> None:
    with pytest.raises(NotAuthenticated, match=reason):
        authenticator(jwks_file).authenticate(header)


def test_expired_forged_or_foreign_jwts_are_refused(jwks_file: Path, signing_key) -> None:
    auth = authenticator(jwks_file)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = [
        token(signing_key, exp=int(time.time()) - 10),  # expired
        token(other_key),  # forged: signed by a key the JWKS does not hold
        token(signing_key, aud="another-app"),
        token(signing_key, iss="https://evil.example"),
    ]
    for credential in refused:
        with pytest.raises(NotAuthenticated, match="JWT refused"):
            auth.authenticate(f"Bearer {credential}")


def test_anonymous_only_gets_what_is_spelled_out(jwks_file: Path) -> None:
    anonymous = authenticator(jwks_file, anonymous=["reader"])
    assert anonymous.authenticate(None, "127.0.0.1").roles == {Role.READER}
    assert anonymous.authenticate(None, "::1").roles == {Role.READER}
    for remote in ("10.1.2.3", None, "testclient"):  # anonymous roles are for this machine
        with pytest.raises(NotAuthenticated):
            anonymous.authenticate(None, remote)
    with pytest.raises(NotAuthenticated):
        authenticator(jwks_file).authenticate(None)


def test_over_http_401_403_and_no_secret_in_the_log(start_web_node, tmp_path: Path) -> None:
    web = start_web_node(workers={"count": 0}, auth={"anonymous": ["reader"]})
    studies = f"{web.dicomweb}/studies"
    assert httpx.get(studies).status_code == 200  # anonymous reader, as configured
    refused = httpx.post(studies, content=b"", headers={"Content-Type": "multipart/related"})
    assert refused.status_code == 403
    assert "lacks the sender role" in refused.json()["detail"]
    wrong = httpx.get(studies, headers={"Authorization": "Bearer guessed-token"})
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    log = web.node.log()
    assert "guessed-token" not in log
    assert all(secret not in log for secret, _ in TOKENS.values())
