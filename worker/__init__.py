"""The worker: JetStream consumers that turn queued jobs into archives in Moodle.

A worker process runs one Chromium and a fixed number of job slots.  For each
job it calls Moodle, renders every report to PDF, packs the archive, uploads
it and reports status to Moodle and on NATS.
"""
