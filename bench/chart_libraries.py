"""Which charting library draws the "look inside" views fastest: Plotly (what the page uses, from the `plotly`
Python package), Apache ECharts and Vega-Lite (through vega-embed), each drawing the same three views from the
same numbers in headless Chromium: the attention heatmap's window (40 reply tokens x 96 keys), the logit-lens
grid (13 layers x 512 reply tokens, 8 columns on screen, pan and zoom) and the sampler's stage bars, for a
1,024-token conversation (a 512-token reply after a 512-token prompt) on the GPT-2 124M shape (random weights).
bench/chart_libraries.js is the glue: the same cells, colour scales, colour bars, axis titles, hover text
and selected-token outline for every library.

For each library and view: the first draw (into an emptied element, as when a reply's numbers arrive) and the
redraw for another selected token, in ms to the next painted frame; the libraries take turns within each
repetition (the order rotates), so a busy machine slows them alike. Medians of --reps; one unmeasured round
first. The other libraries' bundles are not part of the project; get them from npm:

    mkdir -p /tmp/charts && cd /tmp/charts && npm pack echarts vega vega-lite vega-embed
    for f in *.tgz; do tar xzf $f --one-top-level; done; cd -
    python -m bench.chart_libraries --echarts /tmp/charts/echarts-*/package/dist/echarts.min.js \\
        --vega /tmp/charts/vega-[0-9]*/package/build/vega.min.js \\
        --vega-lite /tmp/charts/vega-lite-*/package/build/vega-lite.min.js \\
        --vega-embed /tmp/charts/vega-embed-*/package/build/vega-embed.min.js

Needs Debian's Chromium at /usr/bin/chromium and Playwright. Writes bench/results/chart_libraries-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench.decode import machine_info
from bench.inspect_redraw import chromium_page, numbers_of_a_reply
from minigpt.serve.app import SCRIPTS
from minigpt.serve.reply_numbers import as_json

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("plotly", "echarts", "vega-lite")
VIEWS = ("attention", "lens", "sampling")
POSITIONS = (300, 50)  # the selected token: first draw at the one, redraw at the other


def library_version(bundle: Path) -> str:
    """The version of the npm package a bundle is in, or that its banner names ("plotly.js v4.1.1")."""
    for package in (folder / "package.json" for folder in bundle.resolve().parents):
        if package.exists() and "version" in (fields := json.loads(package.read_text())):
            return fields["version"]
    found = re.search(r"v(\d+\.\d+\.\d+)", bundle.read_text(errors="replace")[:300])
    return found.group(1) if found else "?"


def page_html(bundles: list[Path]) -> str:
    scripts = [*SCRIPTS.values(), *bundles, Path(__file__).with_name("chart_libraries.js")]
    charts = "".join(f"<h3>{library}: {view}</h3><div id='{library}-{view}' style='width:512px'></div>"
                     for library in LIBRARIES for view in VIEWS)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            + "".join(f"<script src='{file.as_uri()}'></script>" for file in scripts)
            + f"</head><body style='font-family:sans-serif'>{charts}</body></html>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("echarts", "vega", "vega-lite", "vega-embed"):
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"{name}'s browser bundle (.min.js)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--screenshot", type=Path, help="save the page, every library's views drawn, to this PNG")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/chart_libraries-<date>.json)")
    args = parser.parse_args()
    bundles = [args.echarts, args.vega, args.vega_lite, args.vega_embed]
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        payload = as_json(numbers_of_a_reply(Path(tmp), args.prompt, args.tokens))
        page_file = Path(tmp) / "charts.html"
        page_file.write_text(page_html(bundles), encoding="utf-8")
        info = {**machine_info(), "load_before": os.getloadavg(),
                "versions": {"plotly.js": library_version(SCRIPTS["/minigpt/plotly.min.js"]),
                             **{name: library_version(bundle) for name, bundle in
                                zip(("echarts", "vega", "vega-lite", "vega-embed"), bundles)}}}
        print(f"{info['cpu']}, {info['cores']} cores ({' '.join(info['simd'])}); load average "
              f"{info['load_before'][0]:.2f}; libraries {info['versions']}", flush=True)
        times = {(library, view, kind): [] for library in LIBRARIES for view in VIEWS for kind in ("first", "redraw")}
        with sync_playwright() as p:
            browser, page = chromium_page(p, page_file)
            page.wait_for_function("!!(window.chartBench && window.Plotly && window.echarts && window.vegaEmbed)")
            page.evaluate("payload => chartBench.load(payload)", payload)
            info["browser"] = browser.version
            timed = "([library, view, position, first]) => chartBench.timed(library, view, position, first)"
            for rep in range(args.reps + 1):  # round 0 warms up (JIT, fonts) and is not counted
                for library in LIBRARIES[rep % 3:] + LIBRARIES[:rep % 3]:
                    for view in VIEWS:
                        first = page.evaluate(timed, [library, view, POSITIONS[0], True])
                        redraw = page.evaluate(timed, [library, view, POSITIONS[1], False])
                        if rep:
                            times[(library, view, "first")].append(first)
                            times[(library, view, "redraw")].append(redraw)
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=True)
            browser.close()
    info["load_after"] = os.getloadavg()

    print(f"\n{args.prompt + args.tokens}-token conversation, median of {args.reps} (ms to the next painted frame)")
    print(f"{'view':10s} {'library':10s} {'first draw':>11s} {'another token':>14s}")
    for view in VIEWS:
        for library in LIBRARIES:
            print(f"{view:10s} {library:10s} {statistics.median(times[(library, view, 'first')]):11.1f} "
                  f"{statistics.median(times[(library, view, 'redraw')]):14.1f}")
    print(f"load average before/after: {info['load_before'][0]:.2f} / {info['load_after'][0]:.2f}")
    out = args.out or ROOT / "bench" / "results" / f"chart_libraries-{datetime.now(timezone.utc):%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "conversation": {"prompt": args.prompt, "reply": args.tokens},
                               "reps": args.reps, "positions": POSITIONS,
                               "ms": {f"{library} {view} {kind}": v for (library, view, kind), v in times.items()}},
                              indent=1))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
