"""The Moodle web service client of one archive job.

:class:`MoodleClient` speaks the web service API of the job's flavour
(contract section 2): the REST calls, the ``pluginfile.php`` downloads and the
``upload.php`` upload.  It is the only package that talks HTTP to Moodle, so it
is also the boundary where aiohttp's exceptions become ours
(:mod:`archive_worker.errors`):

* connection errors, timeouts and HTTP 5xx raise
  :class:`~archive_worker.errors.MoodleUnavailable` (transient);
* Moodle's error objects (``errorcode``/``exception``), HTTP 4xx and
  non-OK business statuses raise :class:`~archive_worker.errors.MoodleRejected`;
* answers of the wrong shape, type, content type, or with unsafe names raise
  :class:`~archive_worker.errors.MoodleBadResponse`;
* size limits raise :class:`~archive_worker.errors.DownloadTooLarge`, a wrong
  SHA-1 :class:`~archive_worker.errors.ChecksumMismatch`, a failed backup
  :class:`~archive_worker.errors.BackupFailed`.

Every error carries ``stage`` and, where there is one, ``attempt`` (the
attempt or submission id).  The token travels in query strings and form
fields only: messages and log lines use :func:`~archive_worker.errors.redact_url`,
and aiohttp's own exceptions are never chained, because some of them quote the
full request URL, token included.

Logging (loggers below ``archive_worker.moodle``): every call at DEBUG as
``moodle.call``, failures at WARNING as ``moodle.call.failed``, rejected status
updates at WARNING as ``moodle.status.rejected``.

Modules: :mod:`.client` (:class:`MoodleClient`, which builds each function's
parameters and delegates the rest), :mod:`.wire` (the wsfunctions of each
flavour, parameter encoding, one REST request and the checks on its answer),
:mod:`.reports` (:class:`Report`, :class:`Attachment` and the checks on
report and metadata answers), :mod:`.names` (safe folder, file and attachment
names, pluginfile URLs), :mod:`.transfer` (downloads and uploads).  The names
below are the public API; the modules' own names are internal.
"""

from .client import MoodleClient
from .reports import Attachment, Report
from .wire import encode_params

__all__ = ["Attachment", "MoodleClient", "Report", "encode_params"]
