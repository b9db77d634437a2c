"""moodle-archive-worker: Moodle's archive worker service on NATS JetStream.

Three import packages, layered:

* ``archive_worker`` (this one) is the shared core: configuration, job and
  event types, the NATS adapter, the Moodle web service client, logging and
  telemetry, the CLI, and the Moodle simulator used by tests and the demo.
* ``bridge`` is the HTTP front door that Moodle talks to; it validates jobs
  and queues them on JetStream.
* ``worker`` consumes jobs: renders reports in Chromium, builds the archive
  and uploads it to Moodle.

``bridge`` and ``worker`` depend on ``archive_worker``, never on each other.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moodle-archive-worker")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
