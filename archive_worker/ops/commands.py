"""The operator commands on the ``archive-worker`` Typer app.

Each command parses its options, runs one coroutine from this package on a
fresh connection (never an embedded server) and prints the result: a table,
or JSON with ``--json``.  Errors print one line on stderr and exit 1
(``check`` has its own exit codes: 0 ok, 1 warning, 2 critical).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from archive_worker.broker import Broker
from archive_worker.config import Settings, load_settings
from archive_worker.errors import ArchiveWorkerError, ConfigError

from . import check as check_mod
from . import dlq as dlq_mod
from . import fleet, jobs, natsio, schema
from .output import console, emit

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file.")
]
NatsOpt = Annotated[
    str | None,
    typer.Option(
        "--nats-url", help="NATS server URL(s); unset = the embedded server of `up`."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
JobArg = Annotated[str, typer.Argument(help="Job id (or a unique prefix).")]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _settings(config: Path | None, nats_url: str | None) -> Settings:
    try:
        settings = load_settings(config_file=config, overrides={"nats_url": nats_url})
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


def _with_broker(settings: Settings, action: Callable[[Broker], Awaitable[T]]) -> T:
    async def main() -> T:
        async with natsio.connect(settings) as broker:
            return await action(broker)

    try:
        return asyncio.run(main())
    except ArchiveWorkerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    """Add the operator commands to ``app``."""
    app.command("status")(status)
    app.command("jobs")(list_jobs)
    app.command("job")(job)
    app.command("watch")(watch)
    app.command("workers")(workers)
    app.command("streams")(streams)
    app.command("cancel")(cancel)
    app.command("check")(check)
    app.command("schema")(show_schema)
    dlq_app = typer.Typer(
        help="Dead-lettered jobs (kept without tokens).", no_args_is_help=True
    )
    dlq_app.command("list")(dlq_list)
    dlq_app.command("show")(dlq_show)
    dlq_app.command("retry")(dlq_retry)
    dlq_app.command("purge")(dlq_purge)
    app.add_typer(dlq_app, name="dlq")


def status(
    config: ConfigOpt = None, nats_url: NatsOpt = None, as_json: JsonOpt = False
) -> None:
    """The fleet at a glance: queue, in flight, redeliveries, workers, dead letters."""
    result = _with_broker(_settings(config, nats_url), fleet.fleet_status)
    emit(result, as_json, lambda out: fleet.render_status(result, out))


def list_jobs(
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only this status (repeatable)."),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only jobs updated within, e.g. 30m.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="At most this many rows.")
    ] = 50,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs: flavour, Moodle ids, status, progress, age and worker."""
    max_age = parse_duration(since) if since else None
    rows = _with_broker(
        _settings(config, nats_url),
        lambda b: jobs.list_jobs(
            b, statuses=status or (), max_age_s=max_age, limit=limit
        ),
    )
    emit(rows, as_json, lambda out: jobs.render_jobs(rows, out))


def job(
    job_id: JobArg,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One job's whole event history, and its error if any."""
    history = _with_broker(
        _settings(config, nats_url), lambda b: jobs.job_history(b, job_id)
    )
    emit(history, as_json, lambda out: jobs.render_history(history, out))


def watch(
    job_id: Annotated[
        str | None,
        typer.Argument(help="Follow one job until it ends; none = all jobs."),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="Stop after this long, e.g. 10m.")
    ] = None,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow status events live, with a progress bar per running job."""
    limit = parse_duration(timeout) if timeout else None

    async def follow(b: Broker) -> str | None:
        full = await jobs.resolve_job_id(b, job_id) if job_id else None
        return await jobs.watch(
            b, full, as_json=as_json, out=console(), timeout_s=limit
        )

    try:
        _with_broker(_settings(config, nats_url), follow)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def workers(
    config: ConfigOpt = None, nats_url: NatsOpt = None, as_json: JsonOpt = False
) -> None:
    """The worker registry: slots, jobs, pages, browser restarts, uptime."""
    fleet_now = _with_broker(_settings(config, nats_url), fleet.workers)
    emit(fleet_now, as_json, lambda out: fleet.render_workers(fleet_now, out))


def streams(
    config: ConfigOpt = None, nats_url: NatsOpt = None, as_json: JsonOpt = False
) -> None:
    """The streams and the workers' consumer, with their limits and state."""
    rows = _with_broker(_settings(config, nats_url), fleet.streams)
    emit(rows, as_json, lambda out: fleet.render_streams(rows, out))


def cancel(
    job_id: JobArg,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for a running job to end.")
    ] = jobs.CANCEL_WAIT_S,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a queued or running job; Moodle hears FAILED or CANCELED, no upload."""
    result = _with_broker(
        _settings(config, nats_url), lambda b: jobs.cancel_job(b, job_id, wait_s=wait)
    )
    emit(result, as_json, lambda out: jobs.render_cancel(result, out))
    if result.state == "ended":
        raise typer.Exit(1)


def check(
    moodle_url: Annotated[
        str | None,
        typer.Option("--moodle-url", help="Also check that this URL answers."),
    ] = None,
    max_queue_age: Annotated[
        str,
        typer.Option(
            "--max-queue-age", help="Warn when the oldest waiting job is older."
        ),
    ] = "15m",
    max_redeliveries: Annotated[
        int,
        typer.Option("--max-redeliveries", help="Warn above this many redeliveries."),
    ] = 10,
    skip_browser: Annotated[
        bool,
        typer.Option(
            "--skip-browser", help="Do not launch Chromium (bridge-only hosts)."
        ),
    ] = False,
    critical_only: Annotated[
        bool,
        typer.Option(
            "--critical-only",
            help="Exit 0 on warnings (liveness probes: a backlog is no reason "
            "to restart a worker).",
        ),
    ] = False,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Self-test: NATS, JetStream and streams, Chromium, Moodle; exit 0/1/2."""
    settings = _settings(config, nats_url)
    report = asyncio.run(
        check_mod.run_check(
            settings,
            browser=not skip_browser,
            moodle_url=moodle_url,
            max_queue_age_s=parse_duration(max_queue_age),
            max_redeliveries=max_redeliveries,
        )
    )
    emit(report, as_json, lambda out: check_mod.render_check(report, out))
    code = report.exit_code
    raise typer.Exit(0 if critical_only and code == 1 else code)


def show_schema(
    asyncapi: Annotated[
        bool, typer.Option("--asyncapi", help="Print the AsyncAPI document.")
    ] = False,
    write: Annotated[
        Path | None,
        typer.Option("--write", help="Write both documents into this folder."),
    ] = None,
) -> None:
    """Print the JSON Schema of status events (or the AsyncAPI document)."""
    if write is not None:
        for path in schema.write(write):
            typer.echo(str(path))
        return
    name = schema.ASYNCAPI_FILE if asyncapi else schema.STATUS_SCHEMA_FILE
    typer.echo(schema.generated()[name], nl=False)


def dlq_list(
    config: ConfigOpt = None, nats_url: NatsOpt = None, as_json: JsonOpt = False
) -> None:
    """List dead-lettered jobs."""
    letters = _with_broker(_settings(config, nats_url), dlq_mod.list_letters)
    emit(letters, as_json, lambda out: dlq_mod.render_letters(letters, out))


def dlq_show(
    job_id: JobArg,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one dead letter with its job (without token)."""
    letter = _with_broker(
        _settings(config, nats_url), lambda b: dlq_mod.show_letter(b, job_id)
    )
    emit(letter, as_json, lambda out: dlq_mod.render_letter(letter, out))


def dlq_retry(
    job_id: JobArg,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="ARCHIVE_WORKER_RETRY_TOKEN",
            help="The job's Moodle token, if Moodle still has it.",
        ),
    ] = None,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
) -> None:
    """Republish a dead-lettered job where that can still work; say why not otherwise."""
    settings = _settings(config, nats_url)
    done = _with_broker(
        settings, lambda b: dlq_mod.retry_letter(b, settings, job_id, token=token)
    )
    typer.echo(f"{done}: requeued")


def dlq_purge(
    job_id: Annotated[
        str | None, typer.Argument(help="One job; omit with --all.")
    ] = None,
    purge_all: Annotated[
        bool, typer.Option("--all", help="Remove every dead letter.")
    ] = False,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
) -> None:
    """Remove one dead letter, or all of them with --all."""
    if job_id is None and not purge_all:
        raise typer.BadParameter("give a job id, or --all")
    count = _with_broker(
        _settings(config, nats_url), lambda b: dlq_mod.purge_letters(b, job_id)
    )
    typer.echo(f"removed {count} dead letter(s)")
