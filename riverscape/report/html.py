"""One self-contained HTML report page (works offline) and figure files for experiments.

The page embeds plotly.js once in ``<head>`` and every Plotly figure as a ``<div>`` plus a short
script; matplotlib figures are embedded as base64 PNG images. Nothing is loaded from the network.
"""
from __future__ import annotations

import base64
import html
import io
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.atomic import write_text_atomic
from ..io.figure_files import PLOTLY_CONFIG, save_figure
from .theme import FONT_FAMILY

__all__ = ["ReportPage", "save_figure", "format_cell", "write_text_atomic"]


CSS = f"""
:root {{ --text: #1f2328; --muted: #59636e; --rule: #d8dee4; --zebra: #f6f8fa; --accent: #0072B2; }}
* {{ box-sizing: border-box; }}
body {{ margin: 0; color: var(--text); background: #fff; font-family: {FONT_FAMILY};
       font-size: 16px; line-height: 1.55; }}
main {{ max-width: 1160px; margin: 0 auto; padding: 32px 28px 80px; }}
h1 {{ font-size: 2rem; margin: 0 0 4px; line-height: 1.2; }}
h2 {{ font-size: 1.45rem; margin: 2.2em 0 0.6em; padding-bottom: 0.25em; border-bottom: 1px solid var(--rule); }}
h3 {{ font-size: 1.15rem; margin: 1.6em 0 0.5em; }}
p, ul {{ max-width: 80ch; }}
p.subtitle {{ color: var(--muted); margin-top: 0; }}
code {{ font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.9em;
       background: var(--zebra); padding: 0.1em 0.3em; border-radius: 4px; }}
a {{ color: var(--accent); text-decoration: none; }}
a:hover {{ text-decoration: underline; }}
nav.toc {{ background: var(--zebra); border: 1px solid var(--rule); border-radius: 6px; padding: 12px 20px;
          margin: 20px 0 8px; display: inline-block; min-width: 320px; }}
nav.toc strong {{ display: block; margin-bottom: 4px; }}
nav.toc ul {{ margin: 0; padding-left: 1.2em; }}
nav.toc li.level-3 {{ margin-left: 1.2em; list-style: circle; }}
figure {{ margin: 1.4em 0 2em; padding: 0; }}
figure .plotly-graph-div {{ width: 100%; }}
figure img {{ max-width: 100%; height: auto; display: block; }}
figcaption, caption {{ color: var(--muted); font-size: 0.92rem; text-align: left; margin-top: 6px; }}
caption {{ caption-side: top; margin: 0 0 6px; }}
.label {{ color: var(--text); font-weight: 600; }}
.table-wrap {{ overflow-x: auto; margin: 1.2em 0 2em; }}
table {{ border-collapse: collapse; font-size: 0.93rem; min-width: 40%; }}
th, td {{ padding: 6px 12px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }}
thead th {{ border-bottom: 2px solid #8c959f; background: #fff; white-space: nowrap; }}
tbody tr:nth-child(even) {{ background: var(--zebra); }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
footer {{ color: var(--muted); font-size: 0.85rem; margin-top: 4em; border-top: 1px solid var(--rule); padding-top: 8px; }}
"""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def format_cell(value: Any, digits: int = 4) -> str:
    """Text of a table cell: floats to ``digits`` significant digits, ``None`` as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f"{int(value):d}"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{float(value):.{digits}g}"
    return str(value)


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])"), r"<em>\1</em>"),
]


def _inline(text: str) -> str:
    """Escape HTML, then render `code`, **bold** and *italic*."""
    out = html.escape(text, quote=True)
    for pattern, replacement in _INLINE:
        out = pattern.sub(replacement, out)
    return out


def _markdownish(text: str) -> str:
    """Paragraphs separated by blank lines; blocks whose lines start with ``- `` become lists."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if lines and all(line.startswith(("- ", "* ")) for line in lines):
            items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
            blocks.append(f"<ul>{items}</ul>")
        elif lines:
            blocks.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(blocks)


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int
    anchor: str


class ReportPage:
    """A report page assembled block by block and saved as ONE offline HTML file.

    Examples
    --------
    >>> from riverscape.report import ReportPage
    >>> page = ReportPage("PTQ vs QAT")
    >>> page.add_heading("Summary")
    'summary'
    >>> page.add_table([{"bits": 2, "accuracy": 0.412}], caption="PTQ accuracy")
    >>> "<table>" in page.to_html()
    True
    """

    def __init__(self, title: str, *, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self._blocks: list[str | _Heading] = []
        self._anchors: set[str] = set()
        self._figures = 0
        self._tables = 0
        self._has_plotly = False

    # ---------------------------------------------------------------------------- blocks
    def add_heading(self, text: str, level: int = 2) -> str:
        """Add a section heading (level 2 or 3, listed in the table of contents); returns its anchor."""
        if level not in (2, 3):
            raise ValueError(f"level must be 2 or 3 (the page title is level 1), got {level}")
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
        anchor, n = slug, 2
        while anchor in self._anchors:
            anchor, n = f"{slug}-{n}", n + 1
        self._anchors.add(anchor)
        self._blocks.append(_Heading(text, level, anchor))
        return anchor

    def add_text(self, text: str) -> None:
        """Add paragraphs (blank-line separated; ``- `` lists, `code`, **bold**, *italic*). HTML is escaped."""
        self._blocks.append(_markdownish(text))

    def add_table(
        self,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | Mapping[str, str] | None = None,
        caption: str | None = None,
        *,
        digits: int = 4,
    ) -> None:
        """Add a table of ``rows`` (one dict per row).

        ``columns``: keys to show in order, or ``{key: header}``; default: every key, first-seen order.
        Columns whose values are all numbers are right-aligned; floats get ``digits`` significant digits.
        """
        if columns is None:
            columns = list(dict.fromkeys(key for row in rows for key in row))
        headers = dict(columns) if isinstance(columns, Mapping) else {key: key for key in columns}
        numeric = {
            key: all(_is_number(row.get(key)) for row in rows if row.get(key) is not None) and any(row.get(key) is not None for row in rows)
            for key in headers
        }
        self._tables += 1
        head = "".join(f'<th{" class=num" if numeric[k] else ""} scope="col">{html.escape(str(h))}</th>' for k, h in headers.items())
        body = "\n".join(
            "<tr>" + "".join(f'<td{" class=num" if numeric[k] else ""}>{html.escape(format_cell(row.get(k), digits))}</td>' for k in headers) + "</tr>"
            for row in rows
        )
        label = f'<span class="label">Table {self._tables}.</span> '
        cap = f"<caption>{label}{_inline(caption)}</caption>" if caption else ""
        self._blocks.append(f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>')

    def add_figure(self, fig: Any, caption: str | None = None) -> None:
        """Add a Plotly figure (interactive) or a matplotlib figure (embedded PNG), numbered, with a caption."""
        self._figures += 1
        if hasattr(fig, "to_html") and hasattr(fig, "data"):  # plotly.graph_objects.Figure
            body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self._figures}", config=PLOTLY_CONFIG)
            self._has_plotly = True
        elif hasattr(fig, "savefig"):  # matplotlib.figure.Figure
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            alt = html.escape(caption or f"Figure {self._figures}", quote=True)
            body = f'<img src="data:image/png;base64,{data}" alt="{alt}">'
        else:
            raise ValueError(f"add_figure takes a plotly or matplotlib figure, got {type(fig).__name__}")
        cap = f'<figcaption><span class="label">Figure {self._figures}.</span> {_inline(caption)}</figcaption>' if caption else ""
        self._blocks.append(f'<figure id="fig-{self._figures}">{body}{cap}</figure>')

    # ---------------------------------------------------------------------------- output
    def _toc(self) -> str:
        headings = [b for b in self._blocks if isinstance(b, _Heading)]
        if not headings:
            return ""
        items = "".join(f'<li class="level-{h.level}"><a href="#{h.anchor}">{html.escape(h.text)}</a></li>' for h in headings)
        return f'<nav class="toc" aria-label="Contents"><strong>Contents</strong><ul>{items}</ul></nav>'

    def to_html(self) -> str:
        """The complete page as one string (plotly.js inlined once if any Plotly figure was added)."""
        plotly_js = ""
        if self._has_plotly:
            from plotly.offline import get_plotlyjs

            plotly_js = f'<script type="text/javascript">{get_plotlyjs()}</script>'
        body = "\n".join(
            f'<h{b.level} id="{b.anchor}">{html.escape(b.text)}</h{b.level}>' if isinstance(b, _Heading) else b for b in self._blocks
        )
        subtitle = f'<p class="subtitle">{_inline(self.subtitle)}</p>' if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n{plotly_js}\n</head>\n<body>\n<main>\n"
            f"<h1>{html.escape(self.title)}</h1>\n{subtitle}\n{self._toc()}\n{body}\n"
            "<footer>Generated by riverscape. Self-contained: works offline.</footer>\n</main>\n</body>\n</html>\n"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` atomically; returns the path."""
        return write_text_atomic(path, self.to_html())
