"""What every request handler shares: settings, the intake, the database, the store, auth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Engine

from node.config import HttpSettings, Settings
from node.ingest.intake import Intake
from node.ops.logs import Throttle
from node.roles import Role
from node.store.storage import InstanceStore
from node.web.admin_socket import PEER_UID, local_principal
from node.web.auth import Authenticator, NotAuthenticated, Principal


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    engine: Engine
    store: InstanceStore
    intake: Intake
    auth: Authenticator
    patient_views: Throttle = field(default_factory=Throttle)
    """Each caller's views of patient identifiers, audited once a minute per route."""

    @property
    def http(self) -> HttpSettings:
        assert self.settings.http is not None
        return self.settings.http

    def base_url(self, request: Request) -> str:
        """Where clients reach `/dicom-web` (for RetrieveURLs)."""
        root = self.http.public_url or str(request.base_url)
        return root.rstrip("/") + "/dicom-web"


def retrieve_url(base: str, study: str, series: str = "", instance: str = "") -> str:
    """The WADO-RS URL of a study, a series of it, or an instance of that."""
    url = f"{base}/studies/{study}"
    if series:
        url += f"/series/{series}"
        if instance:
            url += f"/instances/{instance}"
    return url


def web_context(request: Request) -> WebContext:
    context: WebContext = request.app.state.web
    return context


def authenticated(request: Request) -> Principal:
    """A dependency: the caller (401 without a usable credential)."""
    local_uid = request.scope.get("state", {}).get(PEER_UID)
    if local_uid is not None:  # the admin socket: the node's own user, checked on connecting
        return local_principal(local_uid)
    try:
        client = request.client.host if request.client else None
        return web_context(request).auth.authenticate(request.headers.get("authorization"), client)
    except NotAuthenticated as exc:
        raise HTTPException(401, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc


def requires(role: Role) -> Callable[[Request], Principal]:
    """A dependency: the caller, if it holds `role` (else 401 or 403)."""

    def dependency(request: Request) -> Principal:
        principal = authenticated(request)
        if not principal.may(role):
            raise HTTPException(403, detail=f"{principal.name!r} lacks the {role} role")
        return principal

    return dependency


Context = Annotated[WebContext, Depends(web_context)]
