"""A Moodle simulator that speaks Moodle's web service protocol over HTTP.

Used by the test suite and by ``archive-worker demo``.  It serves
``/webservice/rest/server.php``, ``/webservice/pluginfile.php/...`` and
``/webservice/upload.php`` the way Moodle and the archiving plugins do
(contract section 2), keeps per-job state keyed by token, and records every
call so that tests can check what the worker sent.  It is a development tool,
not a Moodle: no database, no users, no permissions beyond the token check.

Modules: :mod:`.server` (HTTP server, call log, fault knobs), :mod:`.model`
(job state), :mod:`.webservice` (the REST server's checks),
:mod:`.functions` and :mod:`.signatures` (the plugins' wsfunctions and their
declared parameters), :mod:`.files` (pluginfile.php, upload.php, drafts),
:mod:`.params` (PHP parameter decoding and Moodle's validation),
:mod:`.responses` (PHP's JSON and Moodle's error shapes), :mod:`.names`
(name patterns), :mod:`.scenario` and :mod:`.assign_scenario` (ready-made
jobs from the bundled reference data).
"""

from .model import (
    DROP,
    PLUGINFILE,
    UPLOAD,
    FileFault,
    RecordedCall,
    SimAttachment,
    SimBackup,
    SimItem,
    SimJob,
)
from .server import Fault, MoodleSimulator

__all__ = [
    "DROP",
    "PLUGINFILE",
    "UPLOAD",
    "Fault",
    "FileFault",
    "MoodleSimulator",
    "RecordedCall",
    "SimAttachment",
    "SimBackup",
    "SimItem",
    "SimJob",
]
