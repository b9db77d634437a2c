"""Post-processing rendered PDFs: PDF/A-3b and image optimisation (worker.pdf).

The PDFs come from a real Chromium (one per module); PDF/A claims are read
back from the converted file's own metadata.
"""

from __future__ import annotations

import base64
import io
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast
from xml.etree import ElementTree

import pytest
import pytest_asyncio
from PIL import Image, ImageDraw
from pypdf import PdfReader
from pypdf.generic import ArrayObject, StreamObject

from archive_worker import __version__
from archive_worker.config import Settings, load_settings
from archive_worker.errors import ConfigError, PostprocessError
from archive_worker.jobs import ImageOptimize
from worker.pdf import check_ghostscript, convert_to_pdfa, docinfo_safe, optimize_images
from worker.render import Renderer

#: Async tests share the module's event loop (and so its Chromium).
module_loop = pytest.mark.asyncio(loop_scope="module")

ICC = (
    Path(__file__).parents[1]
    / "archive_worker/resources/sRGB_v4_ICC_preference_displayclass.icc"
)
PDFAID_NS = "http://www.aiim.org/pdfa/ns/id/"

#: A title Ghostscript 10.0 could not carry into PDF/A's XMP as it is.
AWKWARD_TITLE = "Quiz (Prüfung) \\ Résumé"


def settings(**overrides: object) -> Settings:
    """Settings with PDF/A on."""
    values: dict[str, object] = {"pdfa_conversion": True}
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


def large_jpeg() -> bytes:
    """A 2400 x 1600 photo-like JPEG."""
    picture = Image.new("RGB", (2400, 1600), (240, 240, 230))
    draw = ImageDraw.Draw(picture)
    rnd = random.Random(7)
    for _ in range(300):
        x, y = rnd.randrange(2400), rnd.randrange(1600)
        colour = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
        draw.ellipse(
            (x, y, x + rnd.randrange(20, 300), y + rnd.randrange(20, 300)), fill=colour
        )
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def transparent_png() -> bytes:
    """A 600 x 400 PNG with a half-transparent shape on a clear background."""
    picture = Image.new("RGBA", (600, 400), (255, 0, 0, 0))
    ImageDraw.Draw(picture).ellipse((50, 50, 550, 350), fill=(0, 0, 255, 160))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(kind: str, data: bytes) -> str:
    """``data`` as a data: URI."""
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rendered(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[str, bytes]]:
    """PDFs printed by Chromium: a text page and a page with two images."""
    out = tmp_path_factory.mktemp("rendered")
    pages = {
        "text": f"<title>{AWKWARD_TITLE}</title><p>Archived attempt text</p>",
        "images": (
            "<p>Pictures</p>"
            f'<img style="width:600px" src="{data_uri("jpeg", large_jpeg())}">'
            f'<img src="{data_uri("png", transparent_png())}">'
        ),
    }
    renderer = Renderer(settings(pdfa_conversion=False))
    await renderer.start()
    try:
        async with renderer.session(base_url="http://moodle", job_id="pdf") as s:
            for name, body in pages.items():
                await s.render(
                    f"<!DOCTYPE html><html><head></head><body>{body}</body></html>",
                    out / f"{name}.pdf",
                    paper_format="A4",
                )
    finally:
        await renderer.close()
    yield {name: (out / f"{name}.pdf").read_bytes() for name in pages}


def xmp_values(reader: PdfReader, namespace: str) -> dict[str, str]:
    """Properties of one XMP namespace, whether written as attributes or elements."""
    assert reader.xmp_metadata is not None
    root = ElementTree.fromstring(reader.xmp_metadata.stream.get_data())
    prefix = f"{{{namespace}}}"
    values: dict[str, str] = {}
    for node in root.iter():
        for key, value in node.attrib.items():
            if key.startswith(prefix):
                values[key.removeprefix(prefix)] = value
        if node.tag.startswith(prefix):
            values[node.tag.removeprefix(prefix)] = node.text or ""
    return values


def size(xobject: StreamObject) -> tuple[int, int]:
    """Width and height of an image XObject."""
    return cast(int, xobject["/Width"]), cast(int, xobject["/Height"])


def listing(folder: Path) -> list[str]:
    """Names in ``folder``: temporary files must not be left behind."""
    return sorted(p.name for p in folder.iterdir())


def images_by_size(path: Path) -> dict[str, StreamObject]:
    """Image XObjects of the first page, keyed by their original name."""
    found: dict[str, StreamObject] = {}
    for image in PdfReader(path).pages[0].images:
        assert image.indirect_reference is not None
        xobject = image.indirect_reference.get_object()
        assert isinstance(xobject, StreamObject)
        found[image.name] = xobject
    return found


class TestGhostscriptCheck:
    """Finding Ghostscript at start-up."""

    def test_version_of_the_installed_ghostscript(self) -> None:
        """The installed gs answers with a dotted version."""
        version = check_ghostscript(settings())
        assert version.count(".") >= 1
        assert version.replace(".", "").isdigit()

    def test_missing_ghostscript_is_a_config_error_when_pdfa_is_on(
        self, tmp_path: Path
    ) -> None:
        """A ghostscript_path naming nothing stops start-up with PDF/A on."""
        with pytest.raises(ConfigError) as caught:
            check_ghostscript(settings(ghostscript_path=str(tmp_path / "gs")))
        assert caught.value.key == "ghostscript_path"

    def test_missing_ghostscript_is_accepted_when_pdfa_is_off(
        self, tmp_path: Path
    ) -> None:
        """Without PDF/A a missing gs is no reason to refuse to start."""
        missing = settings(pdfa_conversion=False, ghostscript_path=str(tmp_path / "gs"))
        assert check_ghostscript(missing) == ""


class TestPdfa:
    """PDF/A-3b conversion with Ghostscript."""

    @pytest.mark.browser
    @pytest.mark.slow
    @module_loop
    async def test_converted_file_claims_pdfa3b_with_srgb_intent(
        self, rendered: dict[str, bytes], tmp_path: Path
    ) -> None:
        """The result says PDF/A-3b, carries the sRGB intent and our version key."""
        pdf = tmp_path / "report.pdf"
        pdf.write_bytes(rendered["text"])

        await convert_to_pdfa(pdf, settings())

        reader = PdfReader(pdf)
        assert xmp_values(reader, PDFAID_NS) == {"part": "3", "conformance": "B"}
        intents = cast(ArrayObject, reader.root_object["/OutputIntents"])
        (intent,) = [i.get_object() for i in intents]
        assert str(intent["/S"]) == "/GTS_PDFA1"
        assert str(intent["/OutputConditionIdentifier"]) == "sRGB"
        assert intent["/DestOutputProfile"].get_object().get_data() == ICC.read_bytes()
        assert reader.metadata is not None
        assert str(reader.metadata["/MoodleArchiveWorkerVersion"]) == __version__
        assert str(reader.metadata["/Title"]) == docinfo_safe(AWKWARD_TITLE)
        assert "Archived attempt text" in reader.pages[0].extract_text()
        assert listing(tmp_path) == ["report.pdf"]

    @module_loop
    async def test_corrupt_input_fails_and_is_left_alone(self, tmp_path: Path) -> None:
        """A file that is no PDF raises PostprocessError and stays as it was."""
        pdf = tmp_path / "broken.pdf"
        pdf.write_bytes(b"%PDF-1.7\nnot a pdf at all\n%%EOF\n")

        with pytest.raises(PostprocessError) as caught:
            await convert_to_pdfa(pdf, settings())

        assert caught.value.stage == "postprocess"
        assert "broken.pdf" in caught.value.message
        assert pdf.read_bytes() == b"%PDF-1.7\nnot a pdf at all\n%%EOF\n"
        assert listing(tmp_path) == ["broken.pdf"]

    @pytest.mark.browser
    @module_loop
    async def test_ghostscript_over_time_is_killed(
        self, rendered: dict[str, bytes], tmp_path: Path
    ) -> None:
        """A conversion past pdfa_timeout_s fails and keeps the original."""
        pdf = tmp_path / "report.pdf"
        pdf.write_bytes(rendered["text"])

        with pytest.raises(PostprocessError, match=r"did not finish within 0\.001 s"):
            await convert_to_pdfa(pdf, settings(pdfa_timeout_s=0.001))

        assert pdf.read_bytes() == rendered["text"]
        assert listing(tmp_path) == ["report.pdf"]

    def test_docinfo_text_is_reduced_to_what_ghostscript_keeps(self) -> None:
        """Parentheses, backslashes and accents are rewritten, not dropped whole."""
        assert docinfo_safe(AWKWARD_TITLE) == "Quiz [Prufung] / Resume"
        assert docinfo_safe("日本語") == ""


class TestImageOptimisation:
    """Shrinking and re-encoding images in a rendered PDF."""

    @pytest.mark.browser
    @module_loop
    async def test_large_jpeg_shrinks_and_transparent_png_stays(
        self, rendered: dict[str, bytes], tmp_path: Path
    ) -> None:
        """The JPEG is scaled into the box, the transparent PNG is untouched."""
        pdf = tmp_path / "images.pdf"
        pdf.write_bytes(rendered["images"])
        before = images_by_size(pdf)
        (jpeg_name,) = [n for n, x in before.items() if size(x)[0] == 2400]
        (png_name,) = [n for n, x in before.items() if "/SMask" in x]
        png_before = before[png_name].get_data()

        await optimize_images(pdf, ImageOptimize(width=800, height=600, quality=60))

        after = images_by_size(pdf)
        jpeg = after[jpeg_name]
        assert size(jpeg) == (800, 533)
        assert str(jpeg["/Filter"]) == "/DCTDecode"
        png = after[png_name]
        assert size(png) == (600, 400)
        assert "/SMask" in png
        assert png.get_data() == png_before
        assert pdf.stat().st_size < len(rendered["images"]) / 2
        assert "Pictures" in PdfReader(pdf).pages[0].extract_text()

    @module_loop
    async def test_unreadable_pdf_fails_and_is_left_alone(self, tmp_path: Path) -> None:
        """A file pypdf cannot read raises PostprocessError and stays as it was."""
        pdf = tmp_path / "broken.pdf"
        pdf.write_bytes(b"not a pdf")

        with pytest.raises(PostprocessError):
            await optimize_images(pdf, ImageOptimize(width=800, height=600, quality=60))

        assert pdf.read_bytes() == b"not a pdf"
