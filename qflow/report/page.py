"""``report.html``: one self-contained page (styles inline, images as data URIs, no
scripts, no fetches), readable from disk, on screen and in print."""

from __future__ import annotations

import base64
import html

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1a1a1a; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
.note { color: #555; } .bad { color: #b00020; font-weight: 600; }
nav a { margin-right: 1em; }
"""


class Page:
    """Sections of headings, paragraphs, tables and PNG images, rendered to HTML."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[tuple[str, str, list[str]]] = []  # (id, heading, parts)

    def section(self, anchor: str, heading: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((anchor, heading, parts))
        return parts

    def render(self) -> str:
        nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in self.sections)
        body = "\n".join(f'<section id="{a}"><h2>{html.escape(h)}</h2>\n' + "\n".join(parts)
                         + "\n</section>" for a, h, parts in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
                f"<title>{html.escape(self.title)}</title>\n<style>{STYLE}</style></head>\n"
                f"<body><h1>{html.escape(self.title)}</h1>\n<nav>{nav}</nav>\n{body}\n"
                "</body></html>\n")


def paragraph(text: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    """A table; ``header`` None for none; the ``numeric`` columns right-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or [])
    lines = []
    for row in rows:
        cells = "".join(f'<td class="num">{html.escape(str(v))}</td>' if i in numeric
                        else f"<td>{html.escape(str(v))}</td>" for i, v in enumerate(row))
        lines.append(f"<tr>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f"<table>{thead}<tbody>{''.join(lines)}</tbody></table>"
