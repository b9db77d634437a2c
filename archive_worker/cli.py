"""``archive-worker``: start the roles, run the demo, show the configuration.

Thin by design: parse options, configure logging, call one library function.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__, logs
from .config import Settings, load_settings
from .errors import ArchiveWorkerError, ConfigError
from .jobs import Flavour
from .ops.commands import register as register_operator_commands

app = typer.Typer(
    name="archive-worker",
    help="Archive worker for Moodle's quiz_archiver and local_archiving, on NATS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file.")
]
NatsOpt = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server URL(s); unset = embedded.")
]
LevelOpt = Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, ...")]
FormatOpt = Annotated[
    str | None, typer.Option("--log-format", help="json, console, auto")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Bridge bind address.")]
PortOpt = Annotated[int | None, typer.Option("--port", help="Bridge port.")]
SlotsOpt = Annotated[int | None, typer.Option("--slots", help="Job slots per worker.")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        settings = load_settings(config_file=config, overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _run_roles(settings: Settings, roles: tuple[str, ...]) -> None:
    from .roles import install_stop_signals, run_roles

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run_roles(settings, roles, stop=stop)

    try:
        asyncio.run(main())
    except ArchiveWorkerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def bridge(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Serve the worker HTTP API for Moodle and queue jobs on JetStream."""
    s = _settings(
        config,
        nats_url=nats_url,
        host=host,
        port=port,
        log_level=log_level,
        log_format=log_format,
    )
    _run_roles(s, ("bridge",))


@app.command()
def worker(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    slots: SlotsOpt = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Take jobs from JetStream, render, pack and upload them to Moodle."""
    s = _settings(
        config,
        nats_url=nats_url,
        job_slots=slots,
        log_level=log_level,
        log_format=log_format,
    )
    _run_roles(s, ("worker",))


@app.command()
def up(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    slots: SlotsOpt = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Run bridge and worker in one process (embedded NATS unless --nats-url)."""
    s = _settings(
        config,
        nats_url=nats_url,
        host=host,
        port=port,
        job_slots=slots,
        log_level=log_level,
        log_format=log_format,
    )
    _run_roles(s, ("bridge", "worker"))


@app.command()
def demo(
    flavour: Annotated[
        Flavour, typer.Option(help="The plugin API to submit the job with.")
    ] = Flavour.QUIZ_ARCHIVER,
    output_dir: Annotated[Path, typer.Option(help="Where the ZIP is left.")] = Path(
        "."
    ),
    config: ConfigOpt = None,
    log_level: LevelOpt = "WARNING",
) -> None:
    """Archive the reference quiz through the whole stack and keep the ZIP."""
    from .demo import run_demo

    s = _settings(
        config, log_level=log_level, log_format="console", port=0, embedded_nats_port=0
    )
    try:
        path = asyncio.run(
            run_demo(s, flavour=flavour.value, output_dir=output_dir, echo=typer.echo)
        )
    except ArchiveWorkerError as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"archive: {path}")


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the option table of the README.")
    ] = False,
) -> None:
    """Print the effective configuration, secrets masked."""
    if markdown:
        from .config_doc import markdown_table

        typer.echo(markdown_table(), nl=False)
        return
    s = _settings(config)
    data = s.masked()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key:<{width}}  {json.dumps(value)}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# Operator commands (status, jobs, job, watch, workers, streams, cancel, check,
# schema, dlq) live in archive_worker.ops.
register_operator_commands(app)


def main() -> None:
    """Console script entry point."""
    app()
