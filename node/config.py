"""Typed configuration: one YAML file, validated by pydantic, overridable from the environment.

Relative paths (storage, SQLite database) are resolved against the directory of the config
file, so `config.example.yaml` works from a fresh clone wherever the node is started from.
Environment variables override any key: ``AINODE_NODE__PORT=11113`` sets ``node.port``.
"""

from __future__ import annotations

import enum
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from node.roles import Role
from pipelines.settings import TAGS, AnyPipelineSettings, PipelineSettings, VolumeSettings

ENV_PREFIX = "AINODE_"
ENV_SEPARATOR = "__"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML was built with it (several times the pure-Python one's
speed: every command reads the config)."""

ORIGIN = "origin"
"""The destination that means the peer that sent the series."""
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


@dataclass(frozen=True)
class NoDestination:
    """Why results cannot go where a rule sends them (no such destination, no address)."""

    reason: str


class ConfigError(Exception):
    """The configuration cannot be used; the message names file, key path and line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_ae_title(value: str) -> str:
    """`value` as an AE title (stripped); ValueError when it cannot be one."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return value.strip()


class InboundTlsSettings(_Section):
    """TLS on the node's DICOM port(s): its certificate and key, and the CA that signs the
    client certificates it accepts."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _a_ca_to_check_clients(self) -> InboundTlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA of the clients)")
        return self


class NodeSettings(_Section):
    """The node's own DICOM identity and listener, and what one peer may take of it."""

    ae_title: str = "AINODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1)
    max_pending_connections: int = Field(
        32, ge=1, description="connections still negotiating an association"
    )
    accept_unknown_peers: bool = False
    check_peer_address: bool = Field(
        True, description="a listed AE title is admitted only from its peer's host"
    )
    max_pdu_size: int = Field(
        1_048_576, ge=0, description="maximum PDU we receive, bytes; 0: the node's 4 MiB ceiling"
    )
    max_instance_mb: int = Field(4096, ge=1, description="largest dataset accepted, MiB")
    association_timeout_seconds: float = Field(
        30.0, gt=0, description="ARTIM: the whole A-ASSOCIATE-RQ must arrive within this"
    )
    network_timeout_seconds: float = Field(
        60.0, gt=0, description="each PDU must arrive whole within this"
    )
    min_transfer_kbps: float = Field(
        32.0,
        gt=0,
        description="after network_timeout_seconds, a DIMSE message or a STOW-RS body must have "
        "arrived at least this fast on average, KiB/s (a trickling peer is cut off)",
    )
    max_associations_per_address: int = Field(
        8, ge=1, description="associations one peer address may hold at once"
    )
    receivers: int = Field(
        1, ge=1, le=32, description="receiver processes sharing the port (SO_REUSEPORT)"
    )
    tls: InboundTlsSettings | None = None
    tls_port: int | None = Field(
        None, ge=1, le=65535, description="TLS on this second port; without it, on `port`"
    )

    _ae = field_validator("ae_title")(check_ae_title)


class StorageSettings(_Section):
    """Where received instances are kept."""

    path: Path = Path("./var/storage")
    retention_days: float | None = Field(
        None, gt=0, description="delete studies this old once their jobs are done; none: keep"
    )
    min_free_mb: float = Field(
        100.0, ge=0, description="below this, associations are refused and C-STORE answers A700"
    )


class DatabaseSettings(_Section):
    """SQLAlchemy URL: SQLite by default, PostgreSQL for several hosts or heavy load."""

    url: str = "sqlite:///./var/ainode.db"

    @field_validator("url")
    @classmethod
    def _parseable(cls, value: str) -> str:
        if _database_url(value)["backend"] not in {"sqlite", "postgresql"}:
            raise ValueError("only sqlite and postgresql databases are supported")
        return value


class TlsSettings(_Section):
    """TLS for DIMSE to a peer: the CA that signs it and, for mutual TLS, our certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class Service(enum.StrEnum):
    """What a peer may ask of the node beyond storing and echo (`peers.NAME.allow`)."""

    FIND = "find"
    """C-FIND what the node holds (Patient Root and Study Root)."""
    MOVE = "move"
    """C-MOVE it to a configured peer."""
    GET = "get"
    """C-GET it on its own association."""


class Peer(_Section):
    """A known DICOM application entity: allowed to send, and a place to send results."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings | None = None
    key_images: bool = False  # also send Secondary Capture key images of each result
    retrieve: Literal["move", "get"] = "move"
    """How `ainode fetch` and `fetch_priors` retrieve from it after C-FIND: C-MOVE to the
    node's own AE title (the peer must know it) or C-GET on the same association."""
    allow: list[Service] = []
    """What it may query and retrieve of what the node holds; nothing by default."""
    commitment: bool = False
    """Ask it for storage commitment of the results sent to it (PS3.4 J): a dispatch is
    delivered only when its report says every instance is committed."""

    _ae = field_validator("ae_title")(check_ae_title)


class DicomWebDestination(_Section):
    """A STOW-RS endpoint results can be sent to (a DICOMweb base URL)."""

    url: str = Field(pattern=r"^https?://")
    username: str | None = None
    password: str | None = None
    token: str | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    key_images: bool = False
    retrieve: Literal["wado"] = "wado"
    """Fetching from it: QIDO-RS, then WADO-RS."""


class NotifyOn(enum.StrEnum):
    """When a notification target is told of a job (`notifications.NAME.on`)."""

    POSITIVE = "positive"
    """The job succeeded with a positive result."""
    FAILED = "failed"
    """The job failed for good (failed or dead)."""
    DONE = "done"
    """The job succeeded, positive or not."""
    UNDELIVERED = "undelivered"
    """Its results could not be delivered: a dispatch to a destination went dead."""


class NotificationTarget(_Section):
    """An HTTP endpoint told when a job of a rule with `notify: [NAME]` ends as it asks."""

    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = {}
    on: list[NotifyOn] = [NotifyOn.POSITIVE]
    verify_tls: bool = True


class DeliverySettings(_Section):
    """How a leased queue of outgoing work runs: polled, sent with a network timeout, and
    retried with backoff up to `max_attempts`."""

    max_attempts: int = Field(default=8, ge=1)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    poll_seconds: float = Field(default=0.25, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)


class DispatchSettings(DeliverySettings):
    """How results are sent, and retried when a destination refuses or is down: by default
    for about eight hours (24 attempts, waits doubling from 5 s to 30 min), so the results
    of the night's scans outlast a PACS's maintenance window; then `dead`, which tells the
    rule's `undelivered` notification targets."""

    max_attempts: int = Field(default=24, ge=1)
    retry_max_seconds: float = Field(default=1800.0, gt=0)
    commitment_timeout_seconds: float = Field(default=600.0, gt=0)
    """How long a destination asked to commit (`peers.NAME.commitment`) may take to report
    before the results are sent and the commitment asked again (an attempt spent)."""


class NotifySettings(DeliverySettings):
    """How notifications (`notifications:` targets) are posted and retried."""


class FetchSettings(DeliverySettings):
    """How studies and priors are pulled from a PACS, and retried when it fails."""


class WorkitemSettings(_Section):
    """The UPS-RS worklist (IHE AIW-I): how the node performs the workitems asked of it, and
    whether it announces the jobs its rules start as workitems too."""

    fetch_from: str | None = None
    """A peer or `dicomweb` server (by name) to fetch a workitem's input study from when the
    node does not hold it; without one, the workitem waits for the study to be sent."""
    announce: bool = False
    """Every job the routing rules start is also a workitem (IN PROGRESS, performed by the
    node), so a worklist subscriber sees every AI task the node runs."""
    poll_seconds: float = Field(default=1.0, gt=0)


class SyslogSettings(_Section):
    """Where DICOM audit messages (PS3.15 A.5, RFC 3881 XML) go: a syslog collector over
    UDP (RFC 5426), TCP (RFC 6587, octet counting) or TLS (RFC 5425)."""

    host: str
    port: int = Field(default=514, ge=1, le=65535)
    protocol: Literal["udp", "tcp", "tls"] = "udp"
    ca_file: Path | None = None
    """TLS: the CA that signs the collector's certificate (default: the system's)."""
    poll_seconds: float = Field(default=2.0, gt=0)


class AuditSettings(_Section):
    """The audit trail (always in the database); `syslog` also exports it."""

    syslog: SyslogSettings | None = None


class CompletionSettings(_Section):
    """When a series counts as complete."""

    quiet_seconds: float = Field(
        10.0, gt=0, description="no instance for this long and no open association: complete"
    )
    release_grace_seconds: float = Field(
        1.0,
        ge=0,
        description="after a clean association release, complete this soon instead",
    )
    check_interval_seconds: float = Field(0.25, gt=0, le=10)
    study_quiet_seconds: float = Field(
        30.0, gt=0, description="a study is complete when all its series are and it is this quiet"
    )


class RoutingSettings(_Section):
    """Where the routing rules are (see node/flow/routing/rules.py); none: store only."""

    rules_file: Path | None = None


class WorkerSettings(_Section):
    """Worker processes that run pipelines, and how failed jobs retry."""

    count: int = Field(1, ge=0, le=64)
    lease_seconds: float = Field(30.0, gt=1)
    poll_seconds: float = Field(0.1, gt=0, le=5)
    prefetch_mb: int = Field(
        1024,
        ge=0,
        description="the first worker decodes CT series as they arrive and keeps this much "
        "of their pixels for their jobs; 0: jobs decode their series when they start",
    )
    max_attempts: int = Field(5, ge=1)
    retry_base_seconds: float = Field(5.0, gt=0)
    retry_max_seconds: float = Field(600.0, gt=0)


class LoggingSettings(_Section):
    """Log level; logs never carry patient names or IDs."""

    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
        return value


class TokenSettings(_Section):
    """A bearer token, stored as the SHA-256 of the token (hex): `ainode token new` makes one."""

    name: str = Field(pattern=r"^[A-Za-z0-9._@-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    roles: list[Role] = Field(min_length=1)


class JwtSettings(_Section):
    """OAuth2/OIDC bearer JWTs, verified against the identity provider's keys (a JWKS file)."""

    jwks_file: Path
    issuer: str
    audience: str
    roles_claim: str = "roles"
    name_claim: str = "preferred_username"
    algorithms: list[str] = ["RS256", "ES256"]


class AuthSettings(_Section):
    """Who may call the HTTP server: tokens, JWTs, and the roles of anonymous callers."""

    tokens: list[TokenSettings] = []
    jwt: JwtSettings | None = None
    anonymous: list[Role] = []

    @field_validator("tokens")
    @classmethod
    def _names_are_unique(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        names = [token.name for token in tokens]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"token names must be unique: {', '.join(duplicates)}")
        return tokens


class HttpTlsSettings(_Section):
    cert_file: Path
    key_file: Path


class HttpSettings(_Section):
    """The node's HTTP server (DICOMweb), in a process of its own."""

    host: str = "127.0.0.1"
    port: int = Field(8088, ge=1, le=65535)
    tls: HttpTlsSettings | None = None
    max_request_mb: int = Field(
        4096, ge=1, description="largest STOW-RS request body accepted, MiB"
    )
    auth: AuthSettings = AuthSettings()
    public_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="the base URL clients reach the server at (RetrieveURL), if not the Host",
    )
    allowed_hosts: list[str] = Field(
        [],
        description="host names clients may reach the server by, besides public_url's, the "
        "listen address and the machine's own names (IP addresses are always allowed): a "
        "request naming another host is refused (DNS rebinding)",
    )
    max_header_kb: int = Field(64, ge=1, description="largest request head (431 beyond)")
    header_timeout_seconds: float = Field(
        30.0, gt=0, description="a request head must arrive whole within this (408 beyond)"
    )
    body_idle_seconds: float = Field(
        60.0, gt=0, description="a request body may pause this long (then the connection closes)"
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="open connections at once, per HTTP process (503 beyond; LimitNOFILE above it)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP server processes sharing the port: one serves about one core's "
        "worth of requests; more serve more viewers and remote workers at once (and one "
        "that dies leaves the others serving while it is restarted)",
    )
    nice: int = Field(
        0,
        ge=0,
        le=19,
        description="how much lower the HTTP process's CPU priority is than the DICOM "
        "receivers' (nice increment): when the CPU is short, a storm of HTTP requests slows "
        "the HTTP face rather than DICOM intake; STOW-RS and WADO-RS then yield too, to the "
        "workers' inference as well, so it is off by default",
    )
    cors_origins: list[str] = Field(
        [],
        description="web origins (scheme://host[:port]) whose pages may call the server from "
        "a browser, e.g. a viewer served by the hospital; none: same-origin only",
    )
    trusted_proxies: list[str] = Field(
        [],
        description="addresses of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed (none: those headers are ignored)",
    )
    admin_socket: Path | None = Field(
        None,
        description="the Unix socket where the running node answers its own CLI on this host "
        "(ainode status, jobs list, audit list), as an administrator, to the node's OS user "
        "and root only; default: .admin-<host name>.sock in storage.path",
    )


class Settings(_Section):
    """The whole configuration file."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    peers: dict[str, Peer] = {}
    dicomweb: dict[str, DicomWebDestination] = {}
    completion: CompletionSettings = CompletionSettings()
    routing: RoutingSettings = RoutingSettings()
    workers: WorkerSettings = WorkerSettings()
    volume: VolumeSettings = VolumeSettings()
    pipelines: dict[str, AnyPipelineSettings] = {}
    dispatch: DispatchSettings = DispatchSettings()
    notify: NotifySettings = NotifySettings()
    fetch: FetchSettings = FetchSettings()
    workitems: WorkitemSettings = WorkitemSettings()
    logging: LoggingSettings = LoggingSettings()
    http: HttpSettings | None = None
    notifications: dict[str, NotificationTarget] = {}
    audit: AuditSettings = AuditSettings()

    @field_validator("pipelines", mode="before")
    @classmethod
    def _type_defaults_to_the_name(cls, value: object) -> object:
        """A pipeline without `type` is of the type its name says (`lung-quant: {}`)."""
        if not isinstance(value, Mapping):
            return value
        return {
            name: {"type": name, **entry}
            if isinstance(entry, Mapping) and entry.get("type") is None
            else entry
            for name, entry in value.items()
        }

    @model_validator(mode="after")
    def _someone_may_send(self) -> Settings:
        if not self.peers and not self.node.accept_unknown_peers:
            raise ValueError(
                "no peers are configured and node.accept_unknown_peers is false: "
                "no one could send to this node"
            )
        source = self.workitems.fetch_from
        if source is not None and self.source(source) is None:
            raise ValueError(f"workitems.fetch_from: {source!r} is no peer or dicomweb server")
        return self

    def source(self, name: str) -> Peer | DicomWebDestination | None:
        """A place studies can be fetched from: a peer or a DICOMweb server, by name."""
        return self.peers.get(name) or self.dicomweb.get(name)

    def destination_names(self) -> set[str]:
        """Names rules may send results to (besides `origin`)."""
        return {*self.peers, *self.dicomweb}

    def destination(
        self, name: str, origin_ae: str | None
    ) -> Peer | DicomWebDestination | NoDestination:
        """Where results named `name` go, or why they cannot go there. `origin` is the peer
        whose AE title is `origin_ae`, or (for a DICOMweb sender) the `dicomweb` destination
        named like the sender's token."""
        if name == ORIGIN:
            sender = origin_ae or ""
            found = self.peer_by_ae_title(sender) or self.dicomweb.get(sender)
            return found or NoDestination(f"origin {sender!r} is not a configured peer: no address")
        return (
            self.peers.get(name)
            or self.dicomweb.get(name)
            or NoDestination(f"destination {name!r} is not configured")
        )

    def doubts(self) -> list[str]:
        """What is valid but likely not meant (`config check` prints it, `serve` logs it):
        a DICOMweb sender with no `dicomweb` destination of its token's name, whose results
        cannot go back to it (`origin`)."""
        tokens = self.http.auth.tokens if self.http is not None else []
        return [
            f"http.auth.tokens: {token.name!r} may send (STOW-RS) but dicomweb has no "
            f"{token.name!r} destination: results of what it sends cannot go back to it"
            for token in tokens
            if Role.SENDER in token.roles and token.name not in self.dicomweb
        ]

    def peer_by_ae_title(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers.values() if p.ae_title == ae_title), None)

    def find_peer(self, name_or_ae: str) -> Peer | None:
        """A peer by its config name, else by its AE title."""
        return self.peers.get(name_or_ae) or self.peer_by_ae_title(name_or_ae)


def admin_socket_path(settings: Settings) -> Path | None:
    """Where the node's HTTP server answers its CLI on this host; None without an HTTP server."""
    if settings.http is None:
        return None
    default = settings.storage.path / f".admin-{socket.gethostname()}.sock"
    return settings.http.admin_socket or default


def api_link(settings: Settings) -> str | None:
    """Where the node's HTTP API is (for links in notifications), if it has one."""
    http = settings.http
    if http is None:
        return None
    root = http.public_url or f"{'https' if http.tls else 'http'}://{http.host}:{http.port}"
    return f"{root.rstrip('/')}/api/v1"


def load_settings(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, override from the environment, validate and resolve paths of a config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.load(text, Loader=YAML_LOADER) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections")
    _apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:  # the tree again, for the line of each problem
        raise ConfigError(_describe(path, exc, yaml.compose(text, Loader=YAML_LOADER))) from exc
    return _resolve_paths(settings, path.resolve().parent)


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue
        keys = name[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR)
        target = raw
        for key in keys[:-1]:
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            target = child
        target[keys[-1]] = yaml.load(value, Loader=YAML_LOADER) if value else value


def _describe(path: Path, exc: ValidationError, root_node: yaml.Node | None) -> str:
    lines = [f"{path}: invalid configuration"]
    tags = set(TAGS.values())
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if loc[:1] == ["pipelines"] and len(loc) > 2 and loc[2] in tags:
            del loc[2]  # the settings class a pipeline's type chose
        line = _line_of(root_node, loc)
        where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}: {'.'.join(loc)}: {error['msg']}")
    return "\n".join(lines)


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """1-based line of the deepest part of `loc` present in the YAML tree."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        pair = next(((k, v) for k, v in node.value if str(k.value) == key), None)
        if pair is None:
            break
        line = pair[0].start_mark.line + 1
        node = pair[1]
    return line


DATABASE_URL = re.compile(
    r"(?P<scheme>(?P<backend>\w+)(?:\+\w+)?)://(?P<location>[^?]*)(?P<query>\?.*)?", re.DOTALL
)
"""SQLAlchemy's URL form, `dialect[+driver]://location[?query]`, read without importing
SQLAlchemy (a third of a second that read-only commands do not pay)."""


def _database_url(value: str) -> re.Match[str]:
    url = DATABASE_URL.fullmatch(value)
    if url is None:
        raise ValueError("not a database URL: dialect[+driver]://... (README: Configuration)")
    return url


def _with_sqlite_file_under(value: str, base: Path) -> str:
    """A SQLite URL with a relative file made absolute under `base`; other URLs as given."""
    url = _database_url(value)
    database = url["location"].removeprefix("/")
    if url["backend"] != "sqlite" or not database or database == ":memory:":
        return value
    if Path(database).is_absolute():
        return value
    return f"{url['scheme']}:///{base / database}{url['query'] or ''}"


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    storage = settings.storage.path
    if not storage.is_absolute():
        storage = base / storage
    url = _with_sqlite_file_under(settings.database.url, base)
    rules_file = settings.routing.rules_file
    if rules_file is not None and not rules_file.is_absolute():
        rules_file = (base / rules_file).resolve()
    pipelines = {
        name: _with_model_path(pipeline, base) for name, pipeline in settings.pipelines.items()
    }
    node = settings.node
    if node.tls is not None:
        tls = node.tls.model_copy(
            update={
                key: _under(base, value)
                for key, value in node.tls.model_dump().items()
                if isinstance(value, Path)
            }
        )
        node = node.model_copy(update={"tls": tls})
    http = settings.http
    if http is not None:
        http = http.model_copy(
            update={
                "tls": http.tls
                and http.tls.model_copy(
                    update={
                        "cert_file": _under(base, http.tls.cert_file),
                        "key_file": _under(base, http.tls.key_file),
                    }
                ),
                "admin_socket": http.admin_socket and _under(base, http.admin_socket),
                "auth": http.auth.model_copy(
                    update={
                        "jwt": http.auth.jwt
                        and http.auth.jwt.model_copy(
                            update={"jwks_file": _under(base, http.auth.jwt.jwks_file)}
                        )
                    }
                ),
            }
        )
    audit = settings.audit
    if audit.syslog is not None and audit.syslog.ca_file is not None:
        syslog = audit.syslog.model_copy(update={"ca_file": _under(base, audit.syslog.ca_file)})
        audit = audit.model_copy(update={"syslog": syslog})
    return settings.model_copy(
        update={
            "pipelines": pipelines,
            "node": node,
            "http": http,
            "audit": audit,
            "routing": settings.routing.model_copy(update={"rules_file": rules_file}),
            "storage": settings.storage.model_copy(update={"path": storage.resolve()}),
            "database": settings.database.model_copy(update={"url": url}),
        }
    )


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _with_model_path(pipeline: PipelineSettings, base: Path) -> PipelineSettings:
    model = pipeline.model
    if model is None or model.path is None or model.path.is_absolute():
        return pipeline
    model = model.model_copy(update={"path": (base / model.path).resolve()})
    return pipeline.model_copy(update={"model": model})
