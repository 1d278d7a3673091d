"""A report as a list of simple blocks, rendered to Markdown and to one self-contained HTML page.

The HTML embeds every figure as a base64 data URI, so the page can be mailed or
archived alone; the Markdown links the PNG (and names the SVG) next to it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class TableBlock:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    """A figure written as ``stem.png`` and ``stem.svg`` in the report folder."""

    folder: Path
    stem: str
    caption: str


Block = Heading | Para | Bullets | TableBlock | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, TableBlock):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                     "|" + "---|" * len(block.headers)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("\n".join(lines))
        elif isinstance(block, Image):
            out.append(f"![{block.caption}]({block.stem}.png)\n\n"
                       f"*{block.caption}* (vector: [{block.stem}.svg]({block.stem}.svg))")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child, td.text { text-align: left; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline markup the report uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# Plots at least this wide (in points, 8 in) take the page's width; narrower ones (heatmaps) grow by a
# quarter, no wider than the page: at their own size the wide plots filled two thirds of it.
_WIDE_PT = 576.0


def _image_width(svg: bytes) -> str:
    """The CSS width of a plot, from the width matplotlib wrote into its SVG (in points)."""
    match = re.search(rb'<svg[^>]*\swidth="([0-9.]+)pt"', svg)
    if match is None:
        return "max-width: 100%"
    width = float(match[1])
    return "width: 100%" if width >= _WIDE_PT else f"width: min(100%, {width * 4 / 3 * 1.25:.0f}px)"


# A cell that reads as a number (with sign, %, an interval or a verdict word after it) or as n/a or —.
_NUMBER = re.compile(r"^([+\-]?[0-9.]|n/a$|—$)")


def _align(cell: str) -> str:
    """Numbers align right (the table's default), words left: a claim or a verdict reads from its start."""
    return "" if _NUMBER.match(cell) else ' class="text"'


def to_html(blocks: Sequence[Block], title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, TableBlock):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td{_align(c)}>{_inline(c)}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            svg = (block.folder / f"{block.stem}.svg").read_bytes()
            data = base64.b64encode(svg).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(block.caption)}" style="{_image_width(svg)}" '
                       f'src="data:image/svg+xml;base64,{data}">'
                       f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
