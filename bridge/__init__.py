"""The bridge: speaks the existing worker's HTTP API and queues jobs on JetStream.

It keeps no state of its own; every answer comes from JetStream, so any number
of bridges can serve one Moodle and a restart forgets nothing.

Modules:

* :mod:`bridge.requests` validates the three flavours' request bodies with the
  contract's exact messages and builds the :class:`~archive_worker.jobs.JobSpec`;
* :mod:`bridge.probe` is the Moodle connection probe made during the POST;
* :mod:`bridge.app` is the aiohttp application (:func:`~bridge.app.create_app`);
* :mod:`bridge.server` binds and runs it (:func:`~bridge.server.run_bridge`);
* :mod:`bridge.openapi` is the OpenAPI document served at ``/openapi.json``.
"""
