"""Checkpoints in the JetStream object store, without a browser."""

from __future__ import annotations

from pathlib import Path

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.moodle import Attachment, Report
from worker.checkpoint import JobCheckpoints, checkpoint_name, clear_checkpoints

JOB = "5b1f2a9e-0000-4000-8000-000000000001"


def report(item_id: int) -> Report:
    """A report with one attachment description."""
    attachment = Attachment(
        group="1",
        filename="a.txt",
        filesize=3,
        mimetype="text/plain",
        contenthash="a" * 40,
        download_url="http://moodle/webservice/pluginfile.php/1/a.txt",
        item_id=item_id,
    )
    return Report(item_id, f"f-{item_id}", f"r-{item_id}", "<html/>", [attachment])


class TestJobCheckpoints:
    async def test_round_trip_and_clear(self, broker: Broker, tmp_path: Path) -> None:
        """Saved items come back as they were; clearing leaves the bucket empty."""
        pdf = tmp_path / "r.pdf"
        pdf.write_bytes(b"%PDF-1.7 " + bytes(300_000))
        first = JobCheckpoints(broker, JOB, resume=False)
        for item_id in (1, 2):
            await first.save(report(item_id), pdf, keep_html=item_id == 1)
        assert await first.load(1) is None  # a first delivery never looks

        again = JobCheckpoints(broker, JOB, resume=True)
        one, two, three = [await again.load(i) for i in (1, 2, 3)]
        assert three is None
        assert one is not None
        assert two is not None
        assert one.pdf == pdf.read_bytes()
        assert (one.html, two.html) == ("<html/>", None)
        assert one.report().attachments == report(1).attachments
        assert again.restored == [1, 2]

        assert await clear_checkpoints(broker, JOB, [1, 2, 3]) == 2
        info = await broker.js.stream_info(f"OBJ_{c.CHECKPOINT_BUCKET}")
        assert info.state.messages == 0
        assert await broker.get_checkpoint(checkpoint_name(JOB, 1)) is None

    async def test_undecodable_checkpoint_is_ignored(self, broker: Broker) -> None:
        """A damaged object means the item is done again, not a failed job."""
        await broker.put_checkpoint(checkpoint_name(JOB, 7), b"\xc1 not msgpack")
        assert await JobCheckpoints(broker, JOB, resume=True).load(7) is None
