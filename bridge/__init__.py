"""The bridge: speaks the existing worker's HTTP API and queues jobs on JetStream.

It keeps no state of its own; every answer comes from JetStream, so any number
of bridges can serve one Moodle and a restart forgets nothing.
"""
