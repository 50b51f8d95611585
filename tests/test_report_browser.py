"""The analysis report, opened in a real browser: every figure renders, nothing errors, nothing is fetched.

A small real analysis writes ``report.html``; headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Python Playwright, which downloads nothing at run time) opens it from a ``file://`` URL
with the network blocked, and :func:`check_page` lists everything wrong with it:

- console errors and uncaught page errors (a figure whose script throws, a rejected promise);
- any request that is not ``file:``/``data:``/``blob:`` (the report must work offline);
- every ``Plotly.newPlot("<id>", ...)`` call in the HTML source has a rendered ``.js-plotly-plot``
  with that id, and the page has no other plot divs (rendered count == call count);
- every rendered figure has at least one trace with non-empty, partly finite x/y/z (or values), an SVG
  of non-zero size and drawn marks inside it (trace paths/images with a non-empty box, or a
  non-empty canvas for WebGL traces);
- every ``<img>`` (the report's static PNGs are ``data:`` URIs) has decoded: ``naturalWidth > 0``.

The checker is shown to fail on deliberately broken copies of the report, so a green run means
something. Skipped only outside CI when Chromium or Playwright is missing; with ``CI`` set a
missing browser fails (``.ci/browser.sh`` installs it). Debug a page by hand with
``python tests/test_report_browser.py path/to/report.html``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # ~12 s analysis + ~20 s of page loads on a shared 2-core machine

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # belt and braces: no name resolves, even if a request slipped past the route
]
LOAD_TIMEOUT_MS = 120_000  # a 5 MB page on a loaded machine
RENDER_TIMEOUT_MS = 60_000
NEWPLOT_CALL = re.compile(r"""Plotly\.newPlot\(\s*["']([^"']+)["']""")
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


def chromium_path() -> str | None:
    """``$RIVERSCAPE_CHROMIUM``, else Debian's ``/usr/bin/chromium``, else ``chromium`` on PATH."""
    for candidate in (os.environ.get("RIVERSCAPE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _unavailable(reason: str) -> None:
    """Fail in CI (``.ci/browser.sh`` should have installed it), skip on a developer machine."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: .ci/browser.sh should have installed it", pytrace=False)
    pytest.skip(f"{reason} (apt-get install -y chromium; pip install -e '.[test]')")


# ------------------------------------------------------------------------------ the checker

# Runs before the page's own scripts: collects errors, and wraps Plotly.newPlot (when the bundle assigns
# window.Plotly) so that the checker can await every plot it started, and knows which were started.
_INIT = """(() => {
  window.__rsErrors = [];
  window.__rsPlots = [];
  addEventListener('error', e => __rsErrors.push(String(e.message)));
  addEventListener('unhandledrejection', e => __rsErrors.push(String(e.reason)));
  let current;
  Object.defineProperty(window, 'Plotly', {configurable: true, enumerable: true, get: () => current, set(lib) {
    current = lib;
    try {
      const wrapped = Object.create(lib);  // the bundle's exports are getters: shadow newPlot, keep the rest
      Object.defineProperty(wrapped, 'newPlot', {value(gd, ...rest) {
        const result = lib.newPlot(gd, ...rest);
        __rsPlots.push({id: typeof gd === 'string' ? gd : gd && gd.id,
                        settled: Promise.resolve(result).then(() => null, e => String(e && e.stack || e))});
        return result;
      }});
      current = wrapped;
    } catch (e) { /* unwrappable: the checker still sees the rendered divs */ }
  }});
})();"""

_INSPECT = """async (timeoutMs) => {
  // every started plot settled (or the time is up), then two frames for anything deferred to requestAnimationFrame
  const plots = window.__rsPlots || [];
  const timeUp = new Promise(r => setTimeout(() => r('timeout'), timeoutMs));
  const outcome = await Promise.race([Promise.all(plots.map(p => p.settled)), timeUp]);
  const rejected = outcome === 'timeout' ? [] : plots.map((p, i) => [p.id, outcome[i]]).filter(([, e]) => e);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const GL = /gl$|3d|^surface$|^mesh|^cone$|^volume$|^isosurface$|^streamtube$|map/;
  const numbers = (v) => {
    if (v == null || typeof v === 'string') return [];
    if (ArrayBuffer.isView(v)) return Array.from(v);
    if (Array.isArray(v)) return v.flatMap(e => Array.isArray(e) || ArrayBuffer.isView(e) ? numbers(e) : [e]);
    return [];  // a typed-array spec Plotly failed to decode, or an object: no values
  };
  const figures = [...document.querySelectorAll('.js-plotly-plot')].map(el => {
    const full = el._fullData || [];
    const traces = full.map(t => {
      const lengths = {};
      let finite = 0;
      for (const key of ['x', 'y', 'z', 'values']) {
        const values = numbers(t[key]);
        if (t[key] != null) lengths[key] = values.length;
        finite += values.filter(v => typeof v === 'number' ? Number.isFinite(v) : v != null && v !== '').length;
      }
      return {type: t.type, visible: t.visible, lengths, finite};
    });
    const svg = el.querySelector('svg.main-svg');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    let marks = 0;
    for (const node of el.querySelectorAll('g.trace path, .plot path, g.trace image, .plot image')) {
      if (node.closest('.legend')) continue;
      if (node.tagName.toLowerCase() === 'path') {
        const d = node.getAttribute('d') || '';
        if (d.length < 4 || /^M0,0Z?$/.test(d)) continue;
      } else if (!(node.getAttribute('href') || node.getAttribute('xlink:href'))) continue;
      const b = node.getBBox();
      if (b.width > 0 || b.height > 0) marks += 1;
    }
    if (full.some(t => GL.test(t.type)))
      for (const c of el.querySelectorAll('canvas')) if (c.width > 0 && c.height > 0) marks += 1;
    return {id: el.id, nData: (el.data || []).length, traces, svgWidth: box.width, svgHeight: box.height, marks};
  });
  const plotDivs = [...document.querySelectorAll('.plotly-graph-div')].map(d => d.id);
  const images = [...document.images].map(img => ({
    src: img.currentSrc.slice(0, 60), complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
  }));
  return {figures, plotDivs, images, started: plots.map(p => p.id), timedOut: outcome === 'timeout', rejected};
}"""


def check_page(context: Any, html_path: Path) -> dict[str, Any]:
    """Open ``html_path`` in a new page of the (offline) Playwright ``context``; return what is wrong.

    Returns ``{"problems": [str, ...], "figures": n_rendered, "calls": n_newplot_calls_in_html, "images": n_img,
    "started": n_newplot_calls_seen_at_run_time}``;
    an empty ``problems`` list means the page is good.
    """
    source = html_path.read_text(encoding="utf-8")
    calls = NEWPLOT_CALL.findall(source)
    problems: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: None if r.url.startswith(LOCAL_SCHEMES) else
            problems.append(f"request failed (network is blocked): {r.url[:200]}"))
    page.add_init_script(_INIT)
    try:
        page.goto(html_path.resolve().as_uri(), wait_until="load", timeout=LOAD_TIMEOUT_MS)
        found = page.evaluate(_INSPECT, RENDER_TIMEOUT_MS)
    finally:
        page.close()

    rendered = [f["id"] for f in found["figures"]]
    if found["timedOut"]:
        problems.append(f"figures still rendering after {RENDER_TIMEOUT_MS / 1000:.0f} s")
    problems += [f"Plotly.newPlot({plot_id!r}) rejected: {error}" for plot_id, error in found["rejected"]]
    if found["started"] and sorted(found["started"]) != sorted(calls):
        problems.append(f"Plotly.newPlot ran for {found['started']}, the HTML calls it for {calls}")
    if len(rendered) != len(calls):
        problems.append(f"{len(rendered)} rendered figures for {len(calls)} Plotly.newPlot calls in the HTML")
    if missing := sorted(set(calls) - set(rendered)):
        problems.append(f"Plotly.newPlot called for {missing} but nothing rendered there")
    if unrendered := sorted(set(found["plotDivs"]) - set(rendered)):
        problems.append(f"plot divs never rendered: {unrendered}")
    for fig in found["figures"]:
        name = f"figure {fig['id']!r}"
        with_data = [t for t in fig["traces"] if t["visible"] is not False and any(t["lengths"].values()) and t["finite"] > 0]
        if fig["nData"] == 0 or not fig["traces"]:
            problems.append(f"{name} has no traces")
        elif not with_data:
            problems.append(f"{name}: no trace has non-empty finite x/y/z values: {fig['traces']}")
        if not (fig["svgWidth"] > 0 and fig["svgHeight"] > 0):
            problems.append(f"{name}: its SVG has no size ({fig['svgWidth']}x{fig['svgHeight']})")
        if fig["marks"] == 0:
            problems.append(f"{name}: nothing drawn (no trace path, image or canvas with a non-empty box)")
    for img in found["images"]:
        if not (img["complete"] and img["width"] > 0 and img["height"] > 0):
            problems.append(f"image not decoded ({img['width']}x{img['height']}): {img['src']}...")
    return {"problems": problems, "figures": len(rendered), "calls": len(calls), "images": len(found["images"]),
            "started": len(found["started"])}


def open_browser(playwright: Any, user_data_dir: str | os.PathLike, executable: str) -> Any:
    """A persistent (fresh ``user_data_dir``) headless Chromium context with every non-local request aborted."""
    context = playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
        offline=True, viewport={"width": 1200, "height": 900}, timeout=LOAD_TIMEOUT_MS,
    )
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(LOCAL_SCHEMES) else route.abort())
    return context


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_path()
    if executable is None:
        _unavailable("Chromium not found (/usr/bin/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with sync_playwright() as playwright:
        context = open_browser(playwright, tmp_path_factory.mktemp("chromium-profile"), executable)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """``report.html`` of a real (small, ~10 s) analysis of a briefly trained digits MLP at 2 bits."""
    from helpers import digits_mlp_checkpoint
    from riverscape import cli

    folder = tmp_path_factory.mktemp("report")
    ckpt = folder / "mlp.pt"
    digits_mlp_checkpoint(ckpt, steps=30)
    out = folder / "out"
    code = cli.main(["analyze", str(ckpt), "--bits", "2", "--qat-steps", "5", "--grid-steps", "5", "--top-k", "2",
                     "--max-samples", "128", "--out", str(out)])
    assert code == 0
    assert (out / "report.html").is_file()
    return out / "report.html"


# ------------------------------------------------------------------------------ the report renders


def test_report_renders_in_chromium(browser, report):
    result = check_page(browser, report)
    assert result["problems"] == [], "\n".join(result["problems"])
    assert result["calls"] >= 5, result  # spectra, density, landscapes, paths, alignment, QAT, ...
    assert result["figures"] == result["calls"] == result["started"]  # "started": the newPlot wrapper saw every call


def test_static_figures_decode_in_chromium(browser, tmp_path):
    """The page builder's other figure kind, a matplotlib PNG as a data: URI, decodes next to a Plotly figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    from riverscape.report.html import ReportPage

    page = ReportPage("browser check")
    page.add_figure(go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 0, 2])), caption="interactive")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    page.add_figure(fig, caption="static")
    plt.close(fig)
    path = page.save(tmp_path / "page.html")
    assert 'src="data:image/png;base64,' in path.read_text(encoding="utf-8")
    result = check_page(browser, path)
    assert result["problems"] == [], "\n".join(result["problems"])
    assert (result["figures"], result["calls"], result["started"], result["images"]) == (1, 1, 1, 1)


# ------------------------------------------------------------------------------ the checker can fail


def _figure_data_span(html: str, index: int = 0) -> tuple[int, int, list]:
    """Start, end and value of the trace list passed to the ``index``-th ``Plotly.newPlot`` call."""
    call = list(NEWPLOT_CALL.finditer(html))[index]
    start = html.index("[", call.end())
    data, end = json.JSONDecoder().raw_decode(html, start)
    return start, end, data


def _corrupt_json(html: str) -> str:
    start, _, _ = _figure_data_span(html)
    return html[:start] + '[{"x": ],' + html[start + 1:]  # a SyntaxError: the figure's script never runs


def _empty_values(html: str) -> str:
    start, end, data = _figure_data_span(html)
    emptied = [{**trace, **{k: [] for k in ("x", "y", "z") if k in trace}} for trace in data]
    return html[:start] + json.dumps(emptied) + html[end:]


def _no_traces(html: str) -> str:
    start, end, _ = _figure_data_span(html)
    return html[:start] + "[]" + html[end:]


def _never_plotted(html: str) -> str:
    first = NEWPLOT_CALL.search(html).group(1)
    guard = f'if (document.getElementById("{first}"))'
    assert guard in html
    return html.replace(guard, "if (false)", 1)


def _inject(snippet: str):
    return lambda html: html.replace("</body>", snippet + "</body>", 1)


BROKEN = {
    # name: (edit of the report's HTML, a fragment expected among the problems)
    "figure JSON corrupted": (_corrupt_json, "page error"),
    "figure JSON corrupted (count)": (_corrupt_json, "rendered figures for"),
    "figure values emptied": (_empty_values, "no trace has non-empty"),
    "figure without traces": (_no_traces, "has no traces"),
    "figure never plotted": (_never_plotted, "rendered figures for"),
    "console error": (_inject("<script>console.error('injected failure')</script>"), "console error: injected failure"),
    "image that does not decode": (_inject('<img alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUg">'),
                                   "image not decoded"),
    "external script": (_inject('<script src="https://plotly.invalid/plotly.min.js"></script>'), "network is blocked"),
}


@pytest.fixture(scope="module")
def broken_results(browser, report, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each distinct broken copy of the report, checked once."""
    folder = tmp_path_factory.mktemp("broken")
    html = report.read_text(encoding="utf-8")
    results: dict[Any, dict[str, Any]] = {}
    for edit, _ in BROKEN.values():
        if edit not in results:
            path = folder / f"broken-{len(results)}.html"
            changed = edit(html)
            assert changed != html
            path.write_text(changed, encoding="utf-8")
            results[edit] = check_page(browser, path)
    return results


@pytest.mark.parametrize("case", list(BROKEN))
def test_checker_catches_a_broken_report(broken_results, case):
    edit, expected = BROKEN[case]
    problems = broken_results[edit]["problems"]
    assert any(expected in p for p in problems), f"{case}: expected a problem containing {expected!r}, got {problems}"


if __name__ == "__main__":  # python tests/test_report_browser.py report.html [...]
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        sys.exit("Chromium not found")
    failed = False
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = open_browser(pw, profile, executable)
        for arg in sys.argv[1:]:
            res = check_page(ctx, Path(arg))
            failed |= bool(res["problems"])
            print(f"{arg}: {res['figures']}/{res['calls']} figures, {res['images']} images, {len(res['problems'])} problems")
            for p in res["problems"]:
                print("  -", p)
        ctx.close()
    sys.exit(1 if failed else 0)
