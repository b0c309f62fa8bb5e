"""Who is calling: a bearer token (stored hashed), an OAuth2/OIDC JWT verified against a JWKS
file, or an anonymous caller with the roles `http.auth.anonymous` spells out.

Neither a token nor a JWT is ever logged; a refusal names what was wrong, not the credential.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from node.config import AuthSettings, JwtSettings
from node.roles import Role

log = logging.getLogger(__name__)

ROLE_GRANTS: dict[Role, frozenset[Role]] = {
    Role.SENDER: frozenset({Role.SENDER}),
    Role.READER: frozenset({Role.READER}),
    Role.OPERATOR: frozenset({Role.OPERATOR, Role.READER, Role.PHI}),
    Role.ADMIN: frozenset(Role),
    Role.PHI: frozenset({Role.PHI, Role.READER}),
    Role.WORKER: frozenset({Role.WORKER, Role.READER}),
}
"""What each role allows: an operator also reads and finds studies by patient, an
administrator does everything; a reader sees no patient identifiers in the admin API; a
worker reads the series of the jobs it claims."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (the calling identity of what it sends) and roles."""

    name: str
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        return role in self.roles


def granted(roles: Iterable[Role]) -> frozenset[Role]:
    return frozenset(g for role in roles for g in ROLE_GRANTS[role])


class NotAuthenticated(Exception):
    """No usable credential (HTTP 401)."""


class Authenticator:
    """Turns an Authorization header into a `Principal`."""

    def __init__(self, settings: AuthSettings) -> None:
        self._tokens = {
            bytes.fromhex(token.sha256): Principal(token.name, granted(token.roles))
            for token in settings.tokens
        }
        self._anonymous = (
            Principal("anonymous", granted(settings.anonymous)) if settings.anonymous else None
        )
        self._jwt = _JwtVerifier(settings.jwt) if settings.jwt is not None else None

    def authenticate(self, authorization: str | None, client: str | None = None) -> Principal:
        """The caller; NotAuthenticated when it presents nothing usable. The anonymous roles
        go only to callers on this machine (`client` a loopback address)."""
        if not authorization:
            if self._anonymous is not None and _is_loopback(client):
                return self._anonymous
            raise NotAuthenticated("a bearer token is required")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise NotAuthenticated("use an Authorization: Bearer <token> header")
        if credential.count(".") == 2 and self._jwt is not None:
            return self._jwt.verify(credential)
        digest = hashlib.sha256(credential.encode()).digest()
        for stored, principal in self._tokens.items():
            if hmac.compare_digest(stored, digest):
                return principal
        raise NotAuthenticated("unknown token")


class _JwtVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        self._settings = settings
        self._keys = jwt.PyJWKSet.from_json(settings.jwks_file.read_text())

    def verify(self, token: str) -> Principal:
        settings = self._settings
        try:
            header = jwt.get_unverified_header(token)
            key = self._key(header.get("kid"))
            claims = jwt.decode(
                token,
                key=key,
                algorithms=settings.algorithms,
                audience=settings.audience,
                issuer=settings.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except (jwt.PyJWTError, KeyError) as exc:
            raise NotAuthenticated(f"JWT refused: {exc}") from exc
        name = str(claims.get(settings.name_claim) or claims.get("sub") or "")[:64]
        if not name:
            raise NotAuthenticated(f"JWT has neither {settings.name_claim} nor sub")
        return Principal(name, granted(_roles(_claim(claims, settings.roles_claim))))

    def _key(self, kid: object) -> jwt.PyJWK:
        if kid is None:
            if len(self._keys.keys) != 1:
                raise KeyError("the JWT names no key (kid) and the JWKS holds several")
            return self._keys.keys[0]
        return self._keys[str(kid)]


def _claim(claims: dict[str, object], path: str) -> object:
    """A claim by dotted path (`realm_access.roles`, as Keycloak nests it)."""
    value: object = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _roles(value: object) -> list[Role]:
    """Roles from a list or a space-separated string; names that are no role are ignored."""
    names = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    known = {role.value for role in Role}
    return [Role(name) for name in names if name in known]


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
