"""`ainode`: the node's command line."""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node.ops.logs import configure_logging
from node.roles import Role, ServiceRole

if TYPE_CHECKING:  # each command imports what it needs: `ainode status` loads no torch
    from rich.progress import Progress, TaskID
    from sqlalchemy import Engine

    from node.admin.actions import Changed
    from node.config import Settings
    from node.flow.queue import JobQueue
    from node.flow.routing.admin import Explanation
    from node.flow.routing.engine import SeriesFacts
    from node.ops.audit import AdminAction
    from pipelines.base import Pipeline

app = typer.Typer(
    help="Chest-CT AI node: DICOM in, AI results back to the PACS.",
    no_args_is_help=True,
    rich_markup_mode=None,  # click's plain help: importing Rich's formatter costs every
    # command a fifth of a second
)
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
rules_app = typer.Typer(
    help="Check routing rules and explain their decisions.", no_args_is_help=True
)
app.add_typer(rules_app, name="rules")
jobs_app = typer.Typer(help="List, retry and cancel pipeline jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
models_app = typer.Typer(
    help="Configured models: where they are and whether they load.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
token_app = typer.Typer(help="Bearer tokens for the HTTP server.", no_args_is_help=True)
app.add_typer(token_app, name="token")
guard_app = typer.Typer(
    help="The series input guard: a site's reference of embedded series.", no_args_is_help=True
)
app.add_typer(guard_app, name="guard")
probe_app = typer.Typer(
    help="Site probes: heads fitted on stored embeddings, run as pipelines.", no_args_is_help=True
)
app.add_typer(probe_app, name="probe")

CONFIG_ENV = "AINODE_CONFIG"
"""Where the CLI finds the node's config when --config is not given (the unit sets it)."""

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", envvar=CONFIG_ENV, help="The node's YAML configuration file."),
]


def _settings(path: Path) -> Settings:
    from node.config import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


ServiceRoleOption = Annotated[
    list[ServiceRole] | None,
    typer.Option(
        "--role",
        "-r",
        help="Run this role only (repeat for several); every role when not given.",
        show_default=False,
    ),
]


@app.command()
def serve(config: ConfigOption, role: ServiceRoleOption = None) -> None:
    """Receive DICOM and run the node in the foreground until SIGTERM or Ctrl-C."""
    settings = _settings(config)
    configure_logging(settings.logging.level)
    roles = frozenset(role or ServiceRole)
    if ServiceRole.HTTP in roles and role and settings.http is None:
        typer.echo(f"{config}: the http role needs an http section", err=True)
        raise typer.Exit(2)
    metrics = None
    if settings.http is not None:  # every process counts in one place, /metrics sums them
        from node.ops.metrics_dir import make_metrics_dir

        metrics = make_metrics_dir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)  # before prometheus-client loads

    from node.ops.lifecycle import CannotListen
    from node.service import serve as run
    from node.store.db.engine import DatabaseNotWritable
    from node.store.db.migrate import SchemaNewer

    try:
        run(settings, roles)
    except (DatabaseNotWritable, CannotListen, SchemaNewer) as exc:
        logging.getLogger("node.service").error("not starting: %s", exc)
        raise typer.Exit(1) from exc
    finally:
        if metrics is not None:
            shutil.rmtree(metrics, ignore_errors=True)


@app.command()
def worker(
    node: Annotated[
        str, typer.Option("--node", help="The node's HTTP URL, e.g. https://ainode.hospital:8088.")
    ],
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="AINODE_WORKER_TOKEN",
            help="A token with the worker role (better from $AINODE_WORKER_TOKEN: argv is public).",
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", envvar=CONFIG_ENV, help="A config for its pipelines and volume."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The worker's name (default: the host name).")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="The CA that signed the node's certificate.")
    ] = None,
) -> None:
    """Run the node's jobs on this host, with only its URL and a worker token, until SIGTERM
    or Ctrl-C (the job in hand is finished first)."""
    import re
    import signal
    import socket
    import threading

    from node.config import Settings
    from node.work.protocol import NAME

    settings = (
        _settings(config)
        if config
        else Settings.model_validate({"node": {"accept_unknown_peers": True}})
    )
    configure_logging(settings.logging.level)
    worker_name = name or socket.gethostname().split(".")[0][:32]
    if re.fullmatch(NAME, worker_name) is None:
        typer.echo(f"--name {worker_name!r}: 1 to 32 letters, digits, '.', '_' or '-'", err=True)
        raise typer.Exit(2)
    from node.work.remote import NodeClient, RemoteWorker, device_description

    pipelines = _pipelines(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    verify: bool | str = str(ca_file) if ca_file else True
    client = NodeClient(node, token, worker_name, verify)
    device = device_description()
    logging.getLogger("node.work.remote").info(
        "worker %s runs %s on %s for %s", worker_name, ", ".join(sorted(pipelines)), device, node
    )
    RemoteWorker(client, settings, pipelines, device).run(stopping)


HEALTH_STALE_SECONDS = 10.0
"""A process tree that has not marked itself alive for this long (it does every 2 s) is not."""


@app.command()
def health(
    config: ConfigOption,
    role: ServiceRoleOption = None,
    alive: Annotated[
        bool, typer.Option("--alive", help="Only whether the tree is alive, not whether it serves.")
    ] = False,
) -> None:
    """Exit 0 when the process tree started with these roles serves (a probe for a service
    manager or Kubernetes); 1, with the reason, when it does not."""
    from node.ops.processes import tree_health

    settings = _settings(config)
    tree = tree_health(settings.storage.path, set(role or ServiceRole), HEALTH_STALE_SECONDS)
    ok = tree.alive if alive else tree.serving
    typer.echo(tree.reason, err=not ok)
    raise typer.Exit(0 if ok else 1)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Configuration file to check.")],
) -> None:
    """Validate a configuration file; exit 0 if it is usable."""
    settings = _settings(file)
    for doubt in settings.doubts():
        typer.echo(f"{file}: warning: {doubt}", err=True)
    typer.echo(
        f"{file}: ok ({settings.node.ae_title} on port {settings.node.port}, "
        f"{len(settings.peers)} peers)"
    )


@app.command()
def status(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Studies, series with their state and counts, jobs, open associations, rules errors."""
    settings = _settings(config)
    answer = _from_node(settings, "/api/v1/status", as_json)
    if answer is None:
        from node.admin.report import node_status, render_text

        engine = _engine(settings)
        report = node_status(settings, engine)
        engine.dispose()
        answer = _json(report.model_dump(mode="json")) if as_json else f"{render_text(report)}\n"
    typer.echo(answer, nl=False)


@app.command()
def verify(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Compare sizes only, not every file's SHA-256.")
    ] = False,
) -> None:
    """Check every stored instance file against the catalog: exit 0 when they agree, 1 with
    what is missing, unrecorded, changed (size or SHA-256) or mislabelled (nothing is
    changed)."""
    import json
    from dataclasses import asdict

    from node.admin.verify import verify_store
    from node.store.storage import InstanceStore

    settings = _settings(config)
    engine = _engine(settings)
    try:
        found = verify_store(engine, InstanceStore(settings.storage.path), quick)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps({**asdict(found), "clean": found.clean}, indent=2))
    else:
        for problem in ("missing", "unrecorded", "changed", "mislabelled"):
            for path in getattr(found, problem):
                typer.echo(f"{problem}: {path}")
        verdict = "every file matches the catalog" if found.clean else "problems above"
        how = "sizes" if quick else "sizes and SHA-256"
        older = f"; {found.unhashed} recorded without a hash, by size" if found.unhashed else ""
        typer.echo(f"{found.checked} files checked ({how}{older}): {verdict}")
    if not found.clean:
        raise typer.Exit(1)


@app.command()
def backup(
    config: ConfigOption,
    dest: Annotated[Path, typer.Argument(help="A new or empty folder.")],
) -> None:
    """Copy the catalog, the store (hard links where it can) and the config while the node
    runs; exit 1 with the reason when it cannot."""
    from node.admin.backup import BackupError
    from node.admin.backup import backup as make_backup

    settings = _settings(config)
    try:
        copied = make_backup(settings, _config_files(config, settings), dest)
    except (BackupError, OSError) as exc:
        typer.echo(f"backup failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    vanished = f"; {copied.vanished} removed meanwhile, skipped" if copied.vanished else ""
    typer.echo(
        f"backed up to {dest}: the catalog, {copied.files} files ({copied.bytes >> 20} MiB, "
        f"{copied.linked} hard-linked{vanished}), the config"
    )


@app.command()
def restore(
    config: ConfigOption,
    source: Annotated[Path, typer.Argument(help="A folder `ainode backup` made.")],
) -> None:
    """Bring a backup into this config's new database and empty storage, before the node's
    first start there; exit 1 with the reason when it cannot."""
    from node.admin.backup import BackupError
    from node.admin.backup import restore as bring_back

    try:
        copied = bring_back(_settings(config), source)
    except (BackupError, OSError) as exc:
        typer.echo(f"restore failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"restored from {source}: the catalog and {copied.files} files")


@app.command()
def upgrade(
    config: ConfigOption,
    backup_to: Annotated[
        Path, typer.Option("--backup", help="Where to back up first (a new or empty folder).")
    ],
) -> None:
    """With the node stopped: list the migrations this version brings, back up, migrate.
    `ainode rollback` puts the backup's catalog back for the previous version."""
    from node.admin.backup import BackupError
    from node.admin.backup import backup as make_backup
    from node.store.db.engine import make_engine
    from node.store.db.migrate import SchemaNewer, pending
    from node.store.db.migrate import upgrade as migrate

    settings = _settings(config)
    running = _running_pid(settings)
    if running is not None:
        typer.echo(f"the node runs (pid {running}): stop it before upgrading", err=True)
        raise typer.Exit(1)
    engine = make_engine(settings.database.url)
    try:
        steps = pending(engine)
        if not steps:
            typer.echo("the database is at this version's schema: nothing to migrate")
            return
        for revision, doc in steps:
            typer.echo(f"will apply {revision}: {doc}")
        make_backup(settings, _config_files(config, settings), backup_to)
        typer.echo(f"backed up to {backup_to}")
        migrate(engine)
    except (SchemaNewer, BackupError, OSError) as exc:
        typer.echo(f"not upgraded: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    typer.echo(
        f"migrated to {steps[-1][0]}; to go back: ainode rollback --config {config} "
        f"{backup_to}, then run the previous version"
    )


@app.command()
def rollback(
    config: ConfigOption,
    source: Annotated[Path, typer.Argument(help="The backup `ainode upgrade` made.")],
) -> None:
    """With the node stopped: put a backup's catalog back (the store stays; what arrived
    since is recorded at the next start), for the version the backup was taken with."""
    from node.admin.backup import BackupError
    from node.admin.backup import rollback as roll_back

    settings = _settings(config)
    running = _running_pid(settings)
    if running is not None:
        typer.echo(f"the node runs (pid {running}): stop it before rolling back", err=True)
        raise typer.Exit(1)
    try:
        kept = roll_back(settings, source)
    except (BackupError, OSError) as exc:
        typer.echo(f"not rolled back: {exc}", err=True)
        raise typer.Exit(1) from exc
    aside = f" (the replaced one kept as {kept})" if kept else ""
    typer.echo(f"the catalog of {source} is back in place{aside}")


def _config_files(config: Path, settings: Settings) -> list[Path]:
    """What a backup keeps of the configuration: the config file and its rules file."""
    rules = settings.routing.rules_file
    return [config, *([rules] if rules is not None and rules.exists() else [])]


def _running_pid(settings: Settings) -> int | None:
    """The pid of a node running on this store, from its running note (None if none is)."""
    from node.store.storage import RUNNING_MARKER

    try:
        pid = int((settings.storage.path / RUNNING_MARKER).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


@app.command()
def echo(
    config: ConfigOption,
    peer: Annotated[str, typer.Argument(help="Peer name from the config, or its AE title.")],
) -> None:
    """Send C-ECHO to a configured peer."""
    from node.edge.scu import echo as send_echo

    settings = _settings(config)
    target = settings.find_peer(peer)
    if target is None:
        known = ", ".join(settings.peers) or "none"
        typer.echo(f"unknown peer {peer!r} (configured: {known})", err=True)
        raise typer.Exit(2)
    result = send_echo(settings.node.ae_title, target)
    typer.echo(f"C-ECHO {target.ae_title}@{target.host}:{target.port}: {result.detail}")
    raise typer.Exit(0 if result.ok else 1)


@rules_app.command("check")
def rules_check(
    file: Annotated[Path, typer.Argument(help="Rules file to check.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", envvar=CONFIG_ENV, help="Also check destinations against this config."
        ),
    ] = None,
) -> None:
    """Exit 0 if the rules are valid; else print FILE:LINE:COLUMN: message and exit 1."""
    from node.flow.routing.rules import RulesError, load_rules

    settings = _settings(config) if config else None
    destinations = settings.destination_names() if settings else None
    notifications = set(settings.notifications) if settings else None
    try:
        rules = load_rules(file, _pipeline_names(settings), destinations, notifications)
    except RulesError as exc:
        for problem in exc.problems:
            typer.echo(problem.render(file))
        raise typer.Exit(1) from exc
    typer.echo(f"{file}: ok ({len(rules.rules)} rules)")


@rules_app.command("explain")
def rules_explain(
    config: ConfigOption,
    series_dir: Annotated[
        Path | None, typer.Option("--series-dir", help="A folder of one series' DICOM files.")
    ] = None,
    series: Annotated[
        str | None, typer.Option("--series", help="Series Instance UID of a stored series.")
    ] = None,
) -> None:
    """Dry run: every rule, every condition with the actual value, and the jobs it would make."""
    from node.flow.routing import admin
    from node.flow.routing.engine import SeriesFacts
    from node.flow.routing.rules import RulesError

    if (series_dir is None) == (series is None):
        typer.echo("give exactly one of --series-dir or --series", err=True)
        raise typer.Exit(2)
    settings = _settings(config)
    try:
        rules = admin.parse(settings, admin.current_text(settings), admin.rules_file(settings))
    except admin.NoRulesFile as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    except RulesError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    if series_dir is not None:
        files = sorted(p for p in series_dir.iterdir() if p.is_file() and _is_dicom(p))
        if not files:
            typer.echo(f"{series_dir}: no DICOM files", err=True)
            raise typer.Exit(2)
        import pydicom

        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        context = {"calling_ae": None, "called_ae": None, "instance_count": len(files)}
        facts = SeriesFacts.read(files[0], uid, context)
    else:
        facts = _stored_series_facts(settings, series or "")
    typer.echo(_render_explanation(admin.explain(rules, facts)))


def _render_explanation(explanation: Explanation) -> str:
    lines = [f"series {explanation.series_instance_uid}"]
    for rule in explanation.rules:
        verdict = "MATCH" if rule.matched else "no match"
        lines.append(f"rule {rule.rule}: {verdict}" + (f" ({rule.note})" if rule.note else ""))
        for condition in rule.conditions:
            mark = "yes" if condition.matched else "no "
            indent = "  " * (condition.depth + 1)
            actual = (
                ""
                if condition.actual is None and condition.description in {"all", "any", "not"}
                else f"  (actual: {condition.actual!r})"
            )
            lines.append(f"{indent}[{mark}] {condition.description}{actual}")
    at_series = [job for job in explanation.jobs if job.at == "series completion"]
    lines.append("jobs at series completion:" if at_series else "jobs at series completion: none")
    for job in explanation.jobs:
        if job.at == "series completion":
            lines.append(
                f"  {job.pipeline} -> {', '.join(job.destinations) or 'no destination'}"
                f" (priority {job.priority}; rules {', '.join(job.rules)})"
            )
        else:
            lines.append(
                f"  at study completion, if chosen: {job.pipeline} (rule {', '.join(job.rules)})"
            )
    return "\n".join(lines)


@app.command()
def run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name, e.g. lung-quant.")],
    input_dir: Annotated[Path, typer.Option("--input", help="Folder of DICOM files.")],
    output: Annotated[Path, typer.Option("--output", help="Folder for the results.")],
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cuda or cpu (default: from config).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", envvar=CONFIG_ENV, help="Node config (pipelines and volume sections)."
        ),
    ] = None,
) -> None:
    """Run a pipeline offline on every series in a folder; write result.json per series."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from node.work.offline import find_series, run_series
    from pipelines.settings import settings_class

    default = {"node": {"accept_unknown_peers": True}}
    from node.config import Settings

    settings = _settings(config) if config else Settings.model_validate(default)
    if device is not None:
        if device not in ("auto", "cuda", "cpu"):
            typer.echo(f"--device must be auto, cuda or cpu, not {device!r}", err=True)
            raise typer.Exit(2)
        configured = settings.pipelines.get(pipeline) or settings_class(pipeline)(type=pipeline)
        settings.pipelines[pipeline] = configured.model_copy(update={"device": device})
    chosen = _pipelines(settings).get(pipeline)
    if chosen is None:
        typer.echo(f"unknown pipeline {pipeline!r}", err=True)
        raise typer.Exit(2)
    series = find_series(input_dir)
    if not series:
        typer.echo(f"no DICOM series under {input_dir}", err=True)
        raise typer.Exit(2)
    failed = 0
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        for uid, files in series.items():
            task = progress.add_task(f"{uid[-24:]} decode", total=len(files))
            outcome = run_series(
                chosen,
                uid,
                files,
                output,
                settings.volume.options(),
                partial(_decoded, progress, task),
                partial(_staged, progress, task, uid),
                settings.node.ae_title,
            )
            progress.remove_task(task)
            if outcome.error or outcome.result is None:
                failed += 1
                typer.echo(f"series {uid}: FAILED: {outcome.error}")
                continue
            seconds = sum(outcome.result.timings.values())
            typer.echo(f"series {uid}: {outcome.files} files, {seconds:.1f} s -> {outcome.output}")
            for region in outcome.result.regions:
                values = ", ".join(
                    f"{m.concept.meaning} {m.value:g} {m.unit.value}" for m in region.measurements
                )
                typer.echo(f"  {region.name}: {values}")
            for finding in outcome.result.findings:
                typer.echo(f"  {finding.concept.meaning}: p={finding.probability:.3f}")
    raise typer.Exit(1 if failed else 0)


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption,
    state: Annotated[str | None, typer.Option("--state", help="Only jobs in this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Jobs, newest first."""
    settings = _settings(config)
    answer = _from_node(settings, "/api/v1/jobs", as_json, {"state": state} if state else None)
    if answer is None:
        engine = _engine(settings)
        jobs = _queue(engine).list(state)
        engine.dispose()
        answer = _json_rows(jobs) if as_json else "".join(f"{job.line()}\n" for job in jobs)
    typer.echo(answer, nl=False)


@jobs_app.command("retry")
def jobs_retry(config: ConfigOption, job_id: Annotated[int, typer.Argument()]) -> None:
    """Queue a job again with a fresh set of attempts."""
    from node.admin import actions
    from node.store.leased import RetryPolicy

    _act(
        config,
        lambda engine, actor, settings: actions.retry_job(
            engine, actor, job_id, RetryPolicy.of(settings.workers)
        ),
        "queued again",
    )


@jobs_app.command("cancel")
def jobs_cancel(config: ConfigOption, job_id: Annotated[int, typer.Argument()]) -> None:
    """Cancel a job that has not finished."""
    from node.admin import actions

    _act(config, lambda engine, actor, _: actions.cancel_job(engine, actor, job_id), "cancelled")


def _act(config: Path, action: Callable[[Engine, str, Settings], Changed], done: str) -> None:
    """Run an admin action as the person at the terminal (with the config, read once):
    exit 0, or 1 with why not."""
    from node.admin.actions import Conflict, NotFound

    settings = _settings(config)
    engine = _engine(settings)
    try:
        changed = action(engine, _operator(), settings)
    except (NotFound, Conflict) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    typer.echo(f"job {changed.id} {done}")


@models_app.command("list")
def models_list(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every configured model: pipeline, source, path, configured SHA-256, device, problem."""
    _models(config, as_json, verify=False)


@models_app.command("verify")
def models_verify(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Hash and load every configured model on its device; exit 1 if any fails."""
    _models(config, as_json, verify=True)


def _models(config: Path, as_json: bool, verify: bool) -> None:
    import json

    from node.work.model_check import model_reports, render_models, verified

    settings = _settings(config)
    reports = model_reports(settings.pipelines)
    if verify:
        reports = verified(reports, settings.pipelines, _pipelines(settings))
    if as_json:
        typer.echo(json.dumps({"models": [r.model_dump() for r in reports]}, indent=2))
    else:
        typer.echo(render_models(reports))
    raise typer.Exit(1 if any(r.problem for r in reports) else 0)


@app.command()
def similar(
    config: ConfigOption,
    series_uid: Annotated[str, typer.Argument(help="Series Instance UID of the query scan.")],
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="How many to list.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The earlier series most similar to this one (cosine of their ct-embedding vectors)."""
    import json
    from dataclasses import asdict

    from node.work.embeddings import NoEmbedding, most_similar

    engine = _engine(_settings(config))
    try:
        found = most_similar(engine, series_uid, top)
    except NoEmbedding as exc:
        typer.echo(f"{exc}: route it to a ct-embedding pipeline first", err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()
    if as_json:
        typer.echo(
            json.dumps(
                {"series_instance_uid": series_uid, "similar": [asdict(f) for f in found]}, indent=2
            )
        )
        return
    if not found:
        typer.echo("no other series has an embedding yet")
    for f in found:
        typer.echo(f"{f.similarity:.4f}  {f.series_instance_uid}  {f.series_description or ''}")


SinceOption = Annotated[
    datetime | None,
    typer.Option(
        "--since", formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"], help="Series embedded since (UTC)."
    ),
]
SeriesListOption = Annotated[
    Path | None,
    typer.Option("--series-list", help="A file of Series Instance UIDs, one per line."),
]
EmbeddingOption = Annotated[
    str | None,
    typer.Option("--pipeline", help="The embedding pipeline (default: the only one)."),
]


@guard_app.command("fit")
def guard_fit(
    config: ConfigOption,
    since: SinceOption = None,
    series_list: SeriesListOption = None,
    pipeline: EmbeddingOption = None,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, help="Distance above which a series is unlike.")
    ] = 1.5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fit the reference of an embedding pipeline on stored series the site trusts, and score
    every stored series against it."""
    import json
    from datetime import UTC

    from node.ops.audit import Action, AdminAction
    from node.work import guard

    settings = _settings(config)
    name = _embedding_pipeline(settings, pipeline)
    if (since is None) == (series_list is None):
        typer.echo("give --since or --series-list (one of them)", err=True)
        raise typer.Exit(2)
    uids = _series_list(series_list) if series_list is not None else None
    engine = _engine(settings)
    try:
        stored = guard.stored_profiles(
            engine, name, uids, since.replace(tzinfo=UTC) if since else None
        )
        fitted = guard.fit(stored.profiles, stored.studies)
        scored = guard.save_reference(engine, name, fitted, threshold)
        facts = AdminAction(action=Action.FIT_GUARD, pipeline=name, profiles=len(stored.profiles))
        _audit(engine, facts)
    except ValueError as exc:
        typer.echo(f"no reference fitted: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    if as_json:
        answer = {"pipeline": name, "threshold": threshold, "scored": scored}
        typer.echo(json.dumps({**answer, "held_out": fitted.held_out}, indent=2))
        return
    count = len(fitted.held_out)
    typer.echo(f"reference of {count} series for {name}; leave-one-study-out distances:")
    for uid, distance in sorted(fitted.held_out.items(), key=lambda item: item[1]):
        mark = "  unlike the others" if distance > threshold else ""
        typer.echo(f"{distance:8.2f}  {uid}{mark}")
    typer.echo(f"threshold {threshold}; {scored} stored series scored")


@probe_app.command("fit")
def probe_fit(
    config: ConfigOption,
    labels: Annotated[
        Path, typer.Option("--labels", help="CSV of series_instance_uid,label (a header is fine).")
    ],
    name: Annotated[str, typer.Option("--name", help="The probe's name.")],
    pipeline: EmbeddingOption = None,
    normal: Annotated[
        str | None, typer.Option("--normal", help="The label that means nothing was found.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Default: <storage>/probes/NAME.json.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fit a logistic head on the stored embeddings of labelled series; print its
    leave-one-out metrics and write the probe file an `embedding-probe` pipeline runs."""
    from node.work.embeddings import stored_embeddings
    from pipelines.probe import fit_probe, save_probe

    settings = _settings(config)
    embedding = _embedding_pipeline(settings, pipeline)
    wanted = _labels(labels)
    engine = _engine(settings)
    try:
        vectors, version = stored_embeddings(engine, embedding, list(wanted))
    finally:
        engine.dispose()
    missing = sorted(set(wanted) - set(vectors))
    if missing:
        typer.echo(f"{len(missing)} labelled series have no {embedding} embedding", err=True)
    try:
        probe = fit_probe(name, embedding, version or "", vectors, wanted, normal)
    except ValueError as exc:
        typer.echo(f"no probe fitted: {exc}", err=True)
        raise typer.Exit(1) from exc
    path = output or settings.storage.path / "probes" / f"{name}.json"
    save_probe(probe, path)
    if as_json:
        typer.echo(probe.metrics.model_dump_json(indent=2))
        return
    metrics = probe.metrics
    typer.echo(
        f"probe {name} on {metrics.series} {embedding} embeddings ({version}), written to {path}"
    )
    typer.echo(f"leave-one-out: {metrics.correct} of {metrics.series} right")
    for label, counts in sorted(metrics.per_class.items()):
        typer.echo(f"  {label:<24} {counts['correct']} of {counts['series']}")
    if metrics.series < 50:
        typer.echo(f"{metrics.series} series prove the plumbing, not the accuracy")


def _labels(path: Path) -> dict[str, str]:
    """Series UID -> label from a CSV of two columns (a header row is skipped)."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = [row for row in csv.reader(file) if row and not row[0].startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        typer.echo(f"cannot read {path}: {exc}", err=True)
        raise typer.Exit(2) from exc
    labels = {
        row[0].strip(): row[1].strip()
        for row in rows
        if len(row) >= 2 and row[0].strip()[:1].isdigit()
    }
    if not labels:
        typer.echo(f"{path}: no rows of series_instance_uid,label", err=True)
        raise typer.Exit(2)
    return labels


def _embedding_pipeline(settings: Settings, name: str | None) -> str:
    """The named embedding pipeline, or the only one configured (exit 2 otherwise)."""
    embedding = sorted(n for n, p in settings.pipelines.items() if p.type == "ct-embedding")
    if name is not None and name not in embedding:
        typer.echo(f"{name!r} is not a ct-embedding pipeline (have: {embedding})", err=True)
        raise typer.Exit(2)
    if name is None and len(embedding) != 1:
        typer.echo(f"name the embedding pipeline with --pipeline (have: {embedding})", err=True)
        raise typer.Exit(2)
    return name or embedding[0]


def _series_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        typer.echo(f"cannot read {path}: {exc}", err=True)
        raise typer.Exit(2) from exc
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _decoded(progress: Progress, task: TaskID, done: int, total: int) -> None:
    progress.update(task, completed=done, total=total)


def _staged(progress: Progress, task: TaskID, series_uid: str, stage: str) -> None:
    progress.update(task, description=f"{series_uid[-24:]} {stage}")


def _operator() -> str:
    """Who acts at the CLI, as the audit trail names them."""
    return f"cli:{getpass.getuser()}"


def _audit(engine: Engine, facts: AdminAction) -> None:
    from node.ops.audit import record

    record(engine, _operator(), facts)


@audit_app.command("list")
def audit_list(
    config: ConfigOption,
    since: Annotated[
        datetime | None,
        typer.Option("--since", formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"], help="UTC."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Audit events, newest first: received, job, sent, fetched, admin."""
    from datetime import UTC

    settings = _settings(config)
    after = since.replace(tzinfo=UTC) if since else None
    query = {"since": after.isoformat()} if after else None
    answer = _from_node(settings, "/api/v1/audit", as_json, query)
    if answer is None:
        from node.ops.audit import list_events

        engine = _engine(settings)
        events = list_events(engine, after)
        engine.dispose()
        answer = _json_rows(events) if as_json else "".join(f"{e.line()}\n" for e in events)
    typer.echo(answer, nl=False)


def _from_node(
    settings: Settings, route: str, as_json: bool, query: dict[str, str] | None = None
) -> str | None:
    """The running node's answer over its admin socket, as the command prints it; None when
    no node answers on this host (the command reads the database itself)."""
    from node.admin.local import ask_node
    from node.config import admin_socket_path

    answer = ask_node(admin_socket_path(settings), route, query, text=not as_json)
    if answer is None or not as_json:
        return answer
    import json

    return _json(json.loads(answer))


def _json(value: object) -> str:
    """JSON as every command prints it, whether the node or the database gave it."""
    import json

    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _json_rows(rows: Sequence[Any]) -> str:
    """Rows (dataclasses) serialised as the HTTP API serialises them."""
    from dataclasses import asdict

    from pydantic import TypeAdapter

    return _json(TypeAdapter(list[Any]).dump_python([asdict(row) for row in rows], mode="json"))


def _engine(settings: Settings) -> Engine:
    """The node's database, at the current schema (exit 2 with the reason otherwise)."""
    from node.store.db.engine import make_engine
    from node.store.db.migrate import SchemaNotCurrent, require_current

    engine = make_engine(settings.database.url)
    try:
        require_current(engine)
    except SchemaNotCurrent as exc:
        engine.dispose()
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    return engine


def _queue(engine: Engine) -> JobQueue:
    from node.flow.queue import JobQueue

    return JobQueue(engine)


def _pipelines(settings: Settings | None) -> dict[str, Pipeline]:
    from pipelines.registry import build_pipelines

    try:
        return build_pipelines(settings.pipelines if settings else None)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def _pipeline_names(settings: Settings | None) -> set[str]:
    """The pipelines rules may name, without building them (no torch)."""
    from pipelines.registry import pipeline_names

    try:
        return pipeline_names(settings.pipelines if settings else None)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def _stored_series_facts(settings: Settings, uid: str) -> SeriesFacts:
    from node.flow.routing.admin import UnknownSeries, stored_facts
    from node.flow.routing.router import NoInstanceLeft

    engine = _engine(settings)
    try:
        return stored_facts(settings, engine, uid)
    except (UnknownSeries, NoInstanceLeft) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()


@app.command()
def fetch(
    config: ConfigOption,
    source: Annotated[str, typer.Option("--from", help="A peer or dicomweb server, by name.")],
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    accession: Annotated[str | None, typer.Option("--accession", help="Accession Number.")] = None,
    patient_id: Annotated[
        str | None, typer.Option("--patient-id", help="Every study of this patient.")
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Only studies with this modality.")
    ] = None,
    since: Annotated[
        datetime | None, typer.Option("--since", formats=["%Y-%m-%d"], help="YYYY-MM-DD.")
    ] = None,
) -> None:
    """Retrieve studies from a PACS (C-FIND, then C-MOVE or C-GET) or a DICOMweb server
    (QIDO-RS, then WADO-RS) into the node: stored, completed and routed like received ones."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from node.delivery.fetch.fetcher import Fetcher
    from node.delivery.fetch.query import FetchQuery
    from node.delivery.fetch.records import list_fetches
    from node.store.db.models import WorkState

    settings = _settings(config)
    if settings.source(source) is None:
        known = ", ".join(sorted({*settings.peers, *settings.dicomweb})) or "none"
        typer.echo(f"unknown source {source!r} (configured: {known})", err=True)
        raise typer.Exit(2)
    try:
        query = FetchQuery(
            study=study,
            accession=accession,
            patient_id=patient_id,
            modality=modality,
            since=since.date() if since else None,
        )
    except ValueError as exc:
        typer.echo("give one of --study, --accession or --patient-id", err=True)
        raise typer.Exit(2) from exc
    engine = _engine(settings)
    fetcher = Fetcher(
        engine, settings, owner=f"ainode-fetch-{os.getpid()}", actor=f"cli:{getpass.getuser()}"
    )
    lease = fetcher.start(source, query)
    fetch_id = lease.id
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True) as bar:
        task = bar.add_task(f"fetch {fetch_id} from {source}")

        def arrived(study_uid: str, count: int) -> None:
            bar.update(task, description=f"study {study_uid}: {count} instances")

        state = fetcher.run(lease, arrived)
    fetcher.close()
    (done,) = [f for f in list_fetches(engine) if f.id == fetch_id]
    engine.dispose()
    if state == WorkState.SUCCEEDED:
        typer.echo(f"fetch {fetch_id}: {len(done.studies)} studies, {done.instances} instances")
        return
    later = " (the running node retries it)" if state == WorkState.RETRYING else ""
    typer.echo(f"fetch {fetch_id} {state}{later}: {done.error}", err=True)
    raise typer.Exit(1)


@token_app.command("new")
def token_new(
    name: Annotated[str, typer.Argument(help="Who holds it: a sender's name, a person.")],
    role: Annotated[list[Role], typer.Option("--role", "-r", help="What the holder may do.")],
) -> None:
    """Make a token: print it once, and the `http.auth.tokens` entry that stores its hash."""
    import hashlib
    import secrets

    from node.config import TokenSettings

    try:
        entry = TokenSettings(name=name, sha256="0" * 64, roles=role)
    except ValueError as exc:
        typer.echo(f"not a token: {exc}", err=True)
        raise typer.Exit(2) from exc
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    typer.echo(f"token (shown once; give it to {entry.name}): {token}", err=True)
    roles = ", ".join(r.value for r in entry.roles)
    typer.echo(f"- {{name: {entry.name}, sha256: {digest}, roles: [{roles}]}}")
