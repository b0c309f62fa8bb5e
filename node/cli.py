"""`ainode`: the node's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.config import ConfigError, Settings, load_settings
from node.logs import configure_logging

app = typer.Typer(
    help="Chest-CT AI node: DICOM in, AI results back to the PACS.", no_args_is_help=True
)
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The node's YAML configuration file.")
]


def _settings(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(config: ConfigOption) -> None:
    """Receive DICOM and run the node in the foreground until SIGTERM or Ctrl-C."""
    from node.service import serve as run

    settings = _settings(config)
    configure_logging(settings.logging.level)
    run(settings)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Configuration file to check.")],
) -> None:
    """Validate a configuration file; exit 0 if it is usable."""
    settings = _settings(file)
    typer.echo(
        f"{file}: ok ({settings.node.ae_title} on port {settings.node.port}, "
        f"{len(settings.peers)} peers)"
    )


@app.command()
def status(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Studies, series with their state and instance counts, open associations."""
    from node.db.engine import make_engine, make_session_factory
    from node.db.migrate import upgrade
    from node.report import build_report, render_text

    settings = _settings(config)
    engine = make_engine(settings.database.url)
    upgrade(engine)
    report = build_report(make_session_factory(engine))
    engine.dispose()
    typer.echo(report.model_dump_json(indent=2) if as_json else render_text(report))


@app.command()
def echo(
    config: ConfigOption,
    peer: Annotated[str, typer.Argument(help="Peer name from the config, or its AE title.")],
) -> None:
    """Send C-ECHO to a configured peer."""
    from node.dimse.scu import echo as send_echo

    settings = _settings(config)
    target = settings.find_peer(peer)
    if target is None:
        known = ", ".join(settings.peers) or "none"
        typer.echo(f"unknown peer {peer!r} (configured: {known})", err=True)
        raise typer.Exit(2)
    result = send_echo(settings.node.ae_title, target)
    typer.echo(f"C-ECHO {target.ae_title}@{target.host}:{target.port}: {result.detail}")
    raise typer.Exit(0 if result.ok else 1)
