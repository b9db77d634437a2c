"""Post-processing of rendered PDFs: image optimisation and PDF/A-3b.

* :func:`optimize_images` shrinks and re-encodes the images of a PDF
  (contract 3.7) with pypdf and Pillow, in a worker thread.
* :func:`convert_to_pdfa` rewrites a PDF as PDF/A-3b with Ghostscript
  (contract 3.8), which runs as a subprocess without a shell.
* :func:`check_ghostscript` finds and probes Ghostscript at start-up.

Both post-processing steps replace the file only when they succeeded and
raise :class:`~archive_worker.errors.PostprocessError` otherwise.  Steps are
logged at DEBUG (``pdf.image_resized``, ``pdfa.complete`` ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from PIL import Image
from pypdf import PdfReader, PdfWriter
from pypdf.errors import PyPdfError
from pypdf.generic import StreamObject

from archive_worker import __version__
from archive_worker.errors import ConfigError, PostprocessError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pypdf._page import ImageFile

    from archive_worker.config import Settings
    from archive_worker.jobs import ImageOptimize

log = logging.getLogger(__name__)

#: Time the start-up probe of Ghostscript may take (contract 4).
GHOSTSCRIPT_PROBE_TIMEOUT_S = 10.0

#: The DOCINFO key that names the worker version in every PDF/A we write.
VERSION_DOCINFO_KEY = "MoodleArchiveWorkerVersion"

#: zlib level for page content streams (contract 4 "PDF content stream
#: compression level 6").
CONTENT_STREAM_COMPRESSION = 6

#: Lines of Ghostscript's stderr quoted in a PostprocessError.
STDERR_TAIL_LINES = 8

ICC_PROFILE = "sRGB_v4_ICC_preference_displayclass.icc"

_VERSION_PATTERN = re.compile(r"\d+\.\d+(?:\.\d+)?")

#: What Ghostscript prints when it gave up PDF/A and wrote a plain PDF.
_PDFA_ABANDONED = "reverting to normal PDF output"

_P = ParamSpec("_P")
_T = TypeVar("_T")

_DOCINFO_REPLACEMENTS = str.maketrans({"(": "[", ")": "]", "\\": "/"})


def check_ghostscript(settings: Settings) -> str:
    """Find Ghostscript and return its version.

    The binary is ``settings.ghostscript_path`` or ``gs`` on the ``PATH``; it
    must answer ``--version`` within 10 s.

    Args:
        settings: the worker's settings.

    Returns:
        The version, e.g. ``10.00.0``; an empty string when Ghostscript is
        unusable but PDF/A conversion is off.

    Raises:
        ConfigError: PDF/A conversion is on and Ghostscript is missing or
            does not work.
    """
    try:
        return _probe(_ghostscript_binary(settings))
    except ConfigError:
        if settings.pdfa_conversion:
            raise
        log.debug("ghostscript.unusable pdfa_conversion=false", exc_info=True)
        return ""


def _ghostscript_binary(settings: Settings) -> str:
    binary = settings.ghostscript_path or shutil.which("gs")
    if not binary:
        raise ConfigError("ghostscript_path", None, "gs not found on the PATH")
    if not Path(binary).is_file():
        raise ConfigError("ghostscript_path", binary, "no such file")

    return binary


def _probe(binary: str) -> str:
    try:
        done = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=GHOSTSCRIPT_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("ghostscript_path", binary, f"cannot run: {exc}") from exc
    match = _VERSION_PATTERN.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise ConfigError(
            "ghostscript_path",
            binary,
            f"--version exited {done.returncode} with {done.stdout.strip()!r}",
        )

    return match.group(0)


async def convert_to_pdfa(pdf: Path, settings: Settings) -> None:
    """Rewrite ``pdf`` in place as PDF/A-3b with Ghostscript.

    Works in a temporary folder next to ``pdf``.  The input gets DOCINFO
    strings Ghostscript can carry into PDF/A (:func:`docinfo_safe`); the
    output must have as many pages as the input and must not be a plain PDF
    Ghostscript fell back to.  Only then does it replace ``pdf``.  On
    cancellation or timeout Ghostscript is killed.

    Args:
        pdf: the PDF to convert.
        settings: ``ghostscript_path`` and ``pdfa_timeout_s`` are used.

    Raises:
        PostprocessError: the PDF is unreadable, or Ghostscript failed,
            timed out or wrote no PDF/A; for a failed Ghostscript the
            message ends with its last stderr lines.
    """
    try:
        binary = _ghostscript_binary(settings)
    except ConfigError as exc:
        raise PostprocessError(str(exc), stage="postprocess") from exc
    started = time.monotonic()
    icc_resource = files("archive_worker").joinpath("resources", ICC_PROFILE)
    with (
        tempfile.TemporaryDirectory(prefix=".pdfa-", dir=pdf.parent) as tmp,
        as_file(icc_resource) as icc,
    ):
        work = Path(tmp)
        prologue, source, output = (
            work / "PDFA_def.ps",
            work / "input.pdf",
            work / "output.pdf",
        )
        pages = await _in_thread(pdf, _prepare_pdfa_input, pdf, source, prologue, icc)
        args = ghostscript_args(
            work=work, prologue=prologue, icc=icc, source=source, output=output
        )
        log.debug("pdfa.started file=%s pages=%d", pdf.name, pages)
        stdout = await _run_ghostscript(binary, args, settings.pdfa_timeout_s, pdf)
        written = await _in_thread(pdf, _page_count, output)
        if written != pages:
            raise PostprocessError(
                f"PDF/A conversion of {pdf.name} wrote {written} of {pages} pages.",
                stage="postprocess",
            )
        os.replace(output, pdf)
    log.debug(
        "pdfa.complete file=%s ms=%d gs=%s",
        pdf.name,
        (time.monotonic() - started) * 1000,
        " | ".join(stdout.splitlines()[-3:]),
    )


async def _in_thread(
    pdf: Path, function: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """Run blocking PDF work in a thread; its failures become ours."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except (PyPdfError, OSError, ValueError) as exc:
        raise PostprocessError(
            f"Post-processing {pdf.name} failed: {exc}", stage="postprocess"
        ) from exc


def _prepare_pdfa_input(pdf: Path, source: Path, prologue: Path, icc: Path) -> int:
    """Write the prologue and the cleaned input; return the page count."""
    prologue.write_text(pdfa_prologue(icc), encoding="ascii")
    # An incremental update only appends the new Info dictionary: fast, and
    # the rendered content stays byte for byte as Chromium wrote it.
    writer = PdfWriter(pdf, incremental=True)
    info: dict[str, object] = dict(writer.metadata or {})
    writer.metadata = {
        key: text
        for key, value in info.items()
        if isinstance(value, str) and (text := docinfo_safe(value))
    }
    with source.open("wb") as out:
        writer.write(out)

    return len(writer.pages)


def _page_count(pdf: Path) -> int:
    # Ghostscript exits 0 for input it cannot parse, writing a PDF without pages.
    return len(PdfReader(pdf).pages) if pdf.is_file() else 0


def docinfo_safe(text: str) -> str:
    """``text`` reduced to what Ghostscript 10.0 keeps in PDF/A's XMP.

    Ghostscript 10.00 (Debian 12) gives up PDF/A -- with
    ``PDFACompatibilityPolicy=0`` it silently writes a plain PDF -- when a
    DOCINFO string holds a parenthesis, a backslash or a non-ASCII
    character ("Text string detected in DOCINFO cannot be represented in
    XMP").  Chromium's ``/Creator`` always has parentheses, a page title
    may have any of them; so accents are dropped, parentheses become
    brackets and what is left over is removed.
    """
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    plain = plain.translate(_DOCINFO_REPLACEMENTS)

    return "".join(char for char in plain if char.isprintable()).strip()


def pdfa_prologue(icc: Path) -> str:
    """The PostScript that sets our DOCINFO key and the sRGB OutputIntent."""
    lines = [
        "%!PS",
        "% Written by moodle-archive-worker for Ghostscript's PDF/A output.",
        f"[ /{VERSION_DOCINFO_KEY} ({_ps_string(__version__)}) /DOCINFO pdfmark",
        f"/WorkerICCFile ({_ps_string(str(icc))}) def",
        "[ /_objdef {WorkerICC} /type /stream /OBJ pdfmark",
        "[ {WorkerICC} << /N 3 >> /PUT pdfmark",
        "[ {WorkerICC} WorkerICCFile (r) file /PUT pdfmark",
        "[ /_objdef {WorkerIntent} /type /dict /OBJ pdfmark",
        "[ {WorkerIntent} <<",
        "  /Type /OutputIntent",
        "  /S /GTS_PDFA1",
        "  /DestOutputProfile {WorkerICC}",
        "  /OutputConditionIdentifier (sRGB)",
        ">> /PUT pdfmark",
        "[ {Catalog} << /OutputIntents [ {WorkerIntent} ] >> /PUT pdfmark",
    ]

    return "\n".join(lines) + "\n"


def ghostscript_args(
    *, work: Path, prologue: Path, icc: Path, source: Path, output: Path
) -> list[str]:
    """Ghostscript's command line for PDF/A-3b (contract 3.8), without binary."""
    return [
        f"--permit-file-read={work}/",
        f"--permit-file-read={prologue}",
        f"--permit-file-read={icc}",
        f"--permit-file-read={source}",
        f"--permit-file-write={work}/",
        "-sDEVICE=pdfwrite",
        "-sColorConversionStrategy=RGB",
        "-dProcessColorModel=/DeviceRGB",
        f"-sOutputICCProfile={icc}",
        f"-sDefaultRGBProfile={icc}",
        "-dCompatibilityLevel=1.7",
        "-dPDFA=3",
        "-dPDFACompatibilityPolicy=0",
        "-dEmbedAllFonts=true",
        "-dSubsetFonts=true",
        "-dCompressFonts=true",
        "-dNOSUBSTFONTS=false",
        "-dNOPAUSE",
        "-dBATCH",
        "-dNOOUTERSAVE",
        # Ghostscript reads %d in the output name as the page number.
        "-sOutputFile=" + str(output).replace("%", "%%"),
        str(prologue),
        str(source),
    ]


async def _run_ghostscript(
    binary: str, args: list[str], timeout_s: float, pdf: Path
) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise PostprocessError(
            f"Ghostscript could not be started: {exc}", stage="postprocess"
        ) from exc
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        raise PostprocessError(
            f"PDF/A conversion of {pdf.name} did not finish within {timeout_s:g} s.",
            stage="postprocess",
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    errors = stderr.decode(errors="replace")
    output = stdout.decode(errors="replace")
    if proc.returncode != 0 or _PDFA_ABANDONED in errors + output:
        # A plain PDF where PDF/A was asked for is a failure, not a result.
        # Ghostscript writes some of its errors to stdout.
        tail = (errors.strip() or output.strip()).splitlines()[-STDERR_TAIL_LINES:]
        outcome = f"exit {proc.returncode}" if proc.returncode else "no PDF/A"
        raise PostprocessError(
            f"PDF/A conversion of {pdf.name} failed (Ghostscript {outcome}): "
            f"{' | '.join(tail) or 'no error output'}",
            stage="postprocess",
        )

    return output


def _ps_string(text: str) -> str:
    """``text`` escaped for a PostScript string literal (in parentheses)."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


async def optimize_images(pdf: Path, options: ImageOptimize) -> None:
    """Shrink and re-encode the images of ``pdf`` in place (contract 3.7).

    Images with transparency (a soft mask, a colour-key mask or an alpha
    channel) and bilevel images are left alone.  An image larger than
    ``options.width`` x ``options.height`` is scaled down to fit, aspect
    ratio kept, and re-encoded as JPEG at ``options.quality``; a smaller one
    is re-encoded only if that makes it smaller (a crisp PNG diagram would
    otherwise come out both blurred and bigger).  Page content streams are
    then compressed.  The work runs in a thread; the file is replaced only
    when it succeeded.

    Raises:
        PostprocessError: the PDF could not be read or written.
    """
    started = time.monotonic()
    replaced = await _in_thread(pdf, _optimize_images, pdf, options)
    log.debug(
        "pdf.images_optimized file=%s replaced=%d ms=%d",
        pdf.name,
        replaced,
        (time.monotonic() - started) * 1000,
    )


def _optimize_images(pdf: Path, options: ImageOptimize) -> int:
    # append() rather than clone_from: the clone warns about the object
    # count of every Chromium PDF, and pages, links and outline are all a
    # report has.
    reader = PdfReader(pdf)
    writer = PdfWriter()
    writer.append(reader)
    if reader.metadata:
        writer.metadata = reader.metadata
    seen: set[int] = set()
    replaced = 0
    for number, page in enumerate(writer.pages, start=1):
        for image in page.images:
            ref = image.indirect_reference
            # Inline images cannot be replaced; shared XObjects only once.
            if ref is None or ref.idnum in seen:
                continue
            seen.add(ref.idnum)
            xobject = ref.get_object()
            if isinstance(xobject, StreamObject):
                replaced += _optimize_image(image, xobject, options, number)
        log.debug("pdf.content_compressed page=%d", number)
        page.compress_content_streams(level=CONTENT_STREAM_COMPRESSION)
    partial = pdf.with_name(pdf.name + ".part")
    with partial.open("wb") as out:
        writer.write(out)
    os.replace(partial, pdf)

    return replaced


def _optimize_image(
    image: ImageFile, xobject: StreamObject, options: ImageOptimize, page: int
) -> bool:
    """Replace one image XObject if that is allowed and worth it."""
    picture = _decodable_picture(image, xobject, page)
    if picture is None:
        return False
    resized = picture.width > options.width or picture.height > options.height
    if resized:
        before = picture.size
        picture.thumbnail((options.width, options.height), Image.Resampling.LANCZOS)
        log.debug(
            "pdf.image_resized page=%d name=%s from=%dx%d to=%dx%d",
            page,
            image.name,
            *before,
            *picture.size,
        )
    elif _jpeg_size(picture, options.quality) >= len(xobject.get_data()):
        log.debug("pdf.image_skipped page=%d name=%s reason=size", page, image.name)
        return False
    image.replace(picture, quality=options.quality, optimize=True, progressive=False)
    log.debug("pdf.image_replaced page=%d name=%s", page, image.name)

    return True


def _decodable_picture(
    image: ImageFile, xobject: StreamObject, page: int
) -> Image.Image | None:
    """The image as RGB or greyscale, or None if it must stay as it is."""
    reason = None
    picture = None
    if "/SMask" in xobject or "/Mask" in xobject:
        reason = "mask"
    else:
        try:
            picture = image.image
        except Exception as exc:  # pypdf raises many types for odd image data
            reason = f"undecodable: {exc}"
    if picture is not None and (_has_alpha(picture) or picture.mode == "1"):
        reason, picture = f"mode {picture.mode}", None
    if picture is None:
        log.debug(
            "pdf.image_skipped page=%d name=%s reason=%s", page, image.name, reason
        )
        return None

    return picture if picture.mode in ("RGB", "L") else picture.convert("RGB")


def _jpeg_size(picture: Image.Image, quality: int) -> int:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality, optimize=True)

    return buffer.tell()


def _has_alpha(picture: Image.Image) -> bool:
    return picture.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in picture.info
    )
