"""Test suite of moodle-archive-worker."""
