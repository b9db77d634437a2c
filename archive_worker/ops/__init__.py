"""Operator commands: see and steer the fleet without the ``nats`` CLI.

Every command is a coroutine taking a connected broker (see
:func:`natsio.connect`) and returning one of the structs in :mod:`.model`;
:mod:`.commands` registers them on the Typer app and prints the result as a
table or, with ``--json``, as JSON.  :mod:`.natsio` is the only module here
that touches nats-py.
"""
