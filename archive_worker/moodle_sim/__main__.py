"""Run the Moodle simulator by hand: ``python -m archive_worker.moodle_sim``.

Registers the reference jobs of all three flavours, prints the base URL and
each job's request body, and serves until interrupted.  POST a body to the
bridge (``/archive`` for quiz_archiver, ``/archive/<flavour>`` otherwise) to
watch a job run against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging

from .model import FLAVOURS
from .scenario import reference_quiz
from .server import MoodleSimulator


async def _serve(host: str, port: int) -> None:
    async with MoodleSimulator(host=host, port=port) as sim:
        print(f"Moodle simulator at {sim.base_url}", flush=True)
        for index, flavour in enumerate(FLAVOURS):
            _, body = reference_quiz(sim, flavour, token=f"demo-token-{index}")
            print(f"\n# {flavour}\n{json.dumps(body, indent=2)}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    """Parse the options and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m archive_worker.moodle_sim")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--verbose", action="store_true", help="log every call")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
