"""A tiny document model (headings, paragraphs, tables, images, lists) rendered as Markdown and as one
self-contained HTML file: CSS inline, every image embedded as a base64 ``data:`` URI, the only links
in-page ``#anchors``. Nothing in the HTML refers to another file or to the network.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str
    style: str = ""  # "", "warning" or "note"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    warning: bool = False  # the caption is a warning (e.g. val metrics instead of test)


@dataclass
class Image:
    path: str  # relative to the report directory
    alt: str
    caption: str = ""


@dataclass
class Bullets:
    items: list[str] = field(default_factory=list)


Block = Heading | Para | Table | Image | Bullets


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# --------------------------------------------------------------------------------------------
# Markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            prefix = {"warning": "> **Warning:** ", "note": "> "}.get(b.style, "")
            out.append(prefix + b.text)
        elif isinstance(b, Table):
            if b.caption:
                out.append(f"> **Warning:** {b.caption}" if b.warning else f"*{b.caption}*")
                out.append("")
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
            if b.caption:
                out.append("")
                out.append(f"*{b.caption}*")
        elif isinstance(b, Bullets):
            out.extend(f"- {item}" for item in b.items)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
caption { caption-side: top; text-align: left; font-style: italic; padding: .3em 0; }
caption.warning, p.warning { color: #8a1c00; font-weight: bold; font-style: normal;
       background: #fff1ec; border-left: 4px solid #c0392b; padding: .4em .6em; }
p.note { background: #f4f7fb; border-left: 4px solid #6b8cc7; padding: .4em .6em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
nav ul { columns: 2; }
"""


def _data_uri(path: Path) -> str:
    kind = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml"}
    mime = kind.get(path.suffix.lower().lstrip("."), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[Block], base: Path, title: str) -> str:
    """Render ``blocks``; images are read from ``base / image.path`` and embedded."""
    e = html.escape
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            aid = b.anchor or anchor(b.text)
            body.append(f'<h{b.level} id="{e(aid)}">{e(b.text)}</h{b.level}>')
            if b.level == 1 and toc:
                items = "".join(
                    f'<li><a href="#{e(h.anchor or anchor(h.text))}">{e(h.text)}</a></li>' for h in toc
                )
                body.append(f"<nav><ul>{items}</ul></nav>")
        elif isinstance(b, Para):
            cls = f' class="{b.style}"' if b.style else ""
            body.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Table):
            cap = ""
            if b.caption:
                cap = (
                    f'<caption class="warning">{e(b.caption)}</caption>'
                    if b.warning
                    else f"<caption>{e(b.caption)}</caption>"
                )
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            src = base / b.path
            if src.is_file():
                img = f'<img src="{_data_uri(src)}" alt="{e(b.alt)}">'
            else:
                img = f'<p class="warning">Image missing: {e(b.path)}</p>'
            cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
            body.append(f"<figure>{img}{cap}</figure>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
