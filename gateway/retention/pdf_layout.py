"""The building blocks of a Japanese A4 PDF with ReportLab: fonts, text, tables, pages.

The fonts are ReportLab's built-in Japanese CID fonts (HeiseiMin-W3, HeiseiKakuGo-W5): no
font file is needed, a PDF reader supplies the glyphs. Text is set in runs, ASCII in
Helvetica and the rest in a CID font: a CID font's own Latin glyphs are placed by widths a
reader's substitute font may not share (they come out spaced apart). Pages are A4 portrait
or landscape (templates ``portrait`` and ``landscape``), with a footer line on the left
and ``n / N`` on the right, stamped once the page count is known.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any
from xml.sax.saxutils import escape

from reportlab.lib import colors  # type: ignore[import-untyped]
from reportlab.lib.pagesizes import A4, landscape  # type: ignore[import-untyped]
from reportlab.lib.styles import ParagraphStyle  # type: ignore[import-untyped]
from reportlab.lib.units import mm  # type: ignore[import-untyped]
from reportlab.pdfbase import pdfmetrics  # type: ignore[import-untyped]
from reportlab.pdfbase.cidfonts import UnicodeCIDFont  # type: ignore[import-untyped]
from reportlab.pdfgen.canvas import Canvas  # type: ignore[import-untyped]
from reportlab.platypus import (  # type: ignore[import-untyped]
    BaseDocTemplate,
    Frame,
    PageTemplate,
    Paragraph,
    Table,
    TableStyle,
)

MINCHO, GOTHIC, LATIN, MONO = "HeiseiMin-W3", "HeiseiKakuGo-W5", "Helvetica", "Courier"
MARGIN = 15 * mm
PADDING = 6
"""A frame's own padding, each side."""
PORTRAIT_WIDTH = A4[0] - 2 * MARGIN - 2 * PADDING
LANDSCAPE_WIDTH, LANDSCAPE_HEIGHT = (side - 2 * MARGIN - 2 * PADDING for side in landscape(A4))
GREY = colors.HexColor("#555555")
RULE = colors.HexColor("#888888")
SHADE = colors.HexColor("#EEEEEE")
_RUNS = re.compile(r"([\x20-\x7e]+)")


@cache
def register_fonts() -> None:
    """Register the Japanese CID fonts, once per process."""
    for name in (MINCHO, GOTHIC):
        pdfmetrics.registerFont(UnicodeCIDFont(name))


def style(size: float = 9.5, font: str = MINCHO, **kw: Any) -> Any:
    """A paragraph style; Japanese may break between any two characters."""
    kw.setdefault("leading", size * 1.45)
    kw.setdefault("wordWrap", "CJK")
    return ParagraphStyle(f"s{size}{font}", fontName=font, fontSize=size, **kw)


def markup(text: str) -> str:
    """Plain text as Paragraph markup: escaped (an organization may be ``A & B``), its
    ASCII runs in Helvetica, its line breaks kept."""
    runs = (
        f"<font name='{LATIN}'>{escape(run)}</font>" if n % 2 else escape(run)
        for n, run in enumerate(_RUNS.split(text))
    )
    return "".join(runs).replace("\n", "<br/>")


def para(text: str, size: float = 9.5, font: str = MINCHO, **kw: Any) -> Any:
    """A paragraph of plain text."""
    return Paragraph(markup(text), style(size, font, **kw))


def mono(text: str, size: float = 8.5) -> Any:
    """A paragraph in Courier: a hash, a path."""
    return Paragraph(escape(text), style(size, MONO))


def under(
    japanese: str, english: str, size: float = 9.5, font: str = MINCHO, small: float = 0
) -> Any:
    """Japanese with the English beneath it, smaller and grey."""
    tail = f"<font size={small or size - 2.5} color='#555555'>{markup(english)}</font>"
    return Paragraph(f"{markup(japanese)}<br/>{tail}", style(size, font, leading=size * 1.3))


def label(japanese: str, english: str) -> Any:
    """A table's label: Japanese, with the English term beneath."""
    return under(japanese, english, 8.5, GOTHIC)


def heading(japanese: str, english: str) -> Any:
    """A section heading: Japanese, then the English, smaller and grey."""
    return Paragraph(
        f"{markup(japanese)}　<font size=9 color='#555555'>{markup(english)}</font>",
        style(12, GOTHIC, spaceBefore=8, spaceAfter=4),
    )


def grid(
    rows: list[list[Any]],
    widths: Sequence[float],
    *extra: tuple[Any, ...],
    heights: Sequence[float] | None = None,
) -> Any:
    """A label/value table: ruled, the first column shaded, cells top-aligned."""
    table = Table(rows, colWidths=widths, rowHeights=heights, hAlign="LEFT")
    table.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.5, RULE),
                ("BACKGROUND", (0, 0), (0, -1), SHADE),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("TOPPADDING", (0, 0), (-1, -1), 3),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 4),
                *extra,
            ]
        )
    )
    return table


def height_of(flowables: Iterable[Any], width: float, room: float) -> float:
    """How much of a frame ``flowables`` take, spacing included."""
    return float(
        sum(f.wrap(width, room)[1] + f.getSpaceBefore() + f.getSpaceAfter() for f in flowables)
    )


class _NumberedCanvas(Canvas):  # type: ignore[misc]
    """Keeps each page until the end, then stamps ``n / N`` on every one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pages: list[dict[str, Any]] = []

    def showPage(self) -> None:  # ReportLab's name
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        total = len(self._pages)
        for number, page in enumerate(self._pages, 1):
            self.__dict__.update(page)
            width, _height = self._pagesize
            self.setFont(LATIN, 8)
            self.setFillColor(GREY)
            self.drawRightString(width - MARGIN, MARGIN / 2, f"{number} / {total}")
            super().showPage()
        super().save()


def _footer(text: str) -> Callable[[Any, Any], None]:
    def draw(canvas: Any, _doc: Any) -> None:
        canvas.saveState()
        canvas.setFillColor(GREY)
        x = MARGIN
        for n, run in enumerate(_RUNS.split(text)):
            font = LATIN if n % 2 else MINCHO
            canvas.setFont(font, 7.5)
            canvas.drawString(x, MARGIN / 2, run)
            x += pdfmetrics.stringWidth(run, font, 7.5)
        canvas.restoreState()

    return draw


def build(story: Iterable[Any], *, footer: str, **info: str) -> bytes:
    """The PDF of ``story`` (starting portrait; ``NextPageTemplate("landscape")`` turns
    the pages), with ``footer`` on each page and ``info`` (title, author, subject,
    creator) as its document information."""
    register_fonts()
    out = io.BytesIO()
    doc = BaseDocTemplate(out, pagesize=A4, **info)
    draw = _footer(footer)
    for name, size in (("portrait", A4), ("landscape", landscape(A4))):
        width, height = size
        frame = Frame(MARGIN, MARGIN, width - 2 * MARGIN, height - 2 * MARGIN, id=name)
        doc.addPageTemplates(PageTemplate(id=name, frames=[frame], onPage=draw, pagesize=size))
    doc.build(list(story), canvasmaker=_NumberedCanvas)
    return out.getvalue()
