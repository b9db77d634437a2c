"""A Moodle simulator that speaks Moodle's web service protocol over HTTP.

Used by the test suite and by ``archive-worker demo``.  It serves
``/webservice/rest/server.php``, ``/webservice/pluginfile.php/...`` and
``/webservice/upload.php`` the way Moodle and the archiving plugins do
(contract section 2), keeps per-job state keyed by token, and records every
call so that tests can check what the worker sent.  It is a development tool,
not a Moodle: no database, no users, no permissions beyond the token check.
"""

from .server import MoodleSimulator, RecordedCall, SimJob

__all__ = ["MoodleSimulator", "RecordedCall", "SimJob"]
