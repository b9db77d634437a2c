"""``archive-worker demo``: the reference quiz through the whole stack.

Starts the embedded NATS, the bridge, a worker and the Moodle simulator,
submits the reference quiz over HTTP exactly as the Moodle plugin would,
prints every status event as it arrives, and copies the archive that the
simulated Moodle received into the output folder.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import msgspec

from .config import Settings
from .devstack import dev_stack
from .errors import ArchiveWorkerError
from .events import StatusEvent
from .moodle_sim.scenario import reference_quiz

Echo = Callable[[str], None]


async def run_demo(
    settings: Settings, *, flavour: str, output_dir: Path, echo: Echo
) -> Path:
    """Archive the reference job of ``flavour`` and return the ZIP's path.

    Raises:
        ArchiveWorkerError: the job did not finish, or no archive arrived.
    """
    with tempfile.TemporaryDirectory(prefix="archive-worker-demo-") as data_dir:
        # A private NATS store: the demo never mixes with a real installation.
        settings = msgspec.structs.replace(settings, data_dir=data_dir, nats_url=None)
        async with dev_stack(settings) as stack:
            echo(f"moodle simulator   {stack.moodle.base_url}")
            echo(f"bridge             {stack.bridge_url}")
            echo(f"nats (embedded)    {stack.broker.url}")
            job, body = reference_quiz(stack.moodle, flavour)
            started = time.monotonic()
            job_id = await stack.submit(flavour, body)
            echo(f"submitted          {flavour} job {job_id}")
            end = await stack.wait_for_end(job_id, on_event=_printer(echo, started))
            if job.archive_path is None:
                raise ArchiveWorkerError(
                    f"job ended {end.status}: {end.error or 'no archive uploaded'}"
                )
            target = output_dir / f"{body_archive_name(body)}.zip"
            await asyncio.to_thread(_copy, job.archive_path, target)
    _summarise(target, echo)

    return target


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def body_archive_name(body: dict[str, object]) -> str:
    """The archive file name a request body asks for."""
    if "archive_filename" in body:
        return str(body["archive_filename"])
    job = body["job"]
    assert isinstance(job, dict)
    return str(job["archive_filename"])


def _printer(echo: Echo, started: float) -> Callable[[StatusEvent], None]:
    def show(event: StatusEvent) -> None:
        parts = [f"{time.monotonic() - started:6.2f}s", f"{event.status:<20}"]
        if event.stage:
            parts.append(f"stage={event.stage}")
        if event.item is not None:
            parts.append(f"item={event.item}")
        if event.progress is not None:
            parts.append(f"progress={event.progress}%")
        if event.error:
            parts.append(f"error={event.error}")
        echo("  ".join(parts))

    return show


def _summarise(path: Path, echo: Echo) -> None:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    echo(
        f"archive            {path} ({path.stat().st_size:,} bytes, {len(names)} files)"
    )
    for name in names:
        if not name.endswith(".sha256"):
            echo(f"  {name}")
