"""The viewer in a real browser: headless Chromium (Debian's), driven by Playwright, loads
`serve`'s live page while the Python client streams the demo trace through the server, and
loads the HTML reports of `probe-cascade run --html` and `probe_cascade.viewer.to_html`. Each
check reads the DOM against the reports the client got.

Screenshots go to $PROBE_CASCADE_SCREENSHOTS when set (docs/img/ has the README's), else to
the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import probe_cascade as pc
from conftest import EXACT, Served, cli

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium")
WORDS = (
    "The model reads each token and the probes light up where a concept is present . "
    "A cascade scores the base layer , then the children of concepts that fire , pruned "
    "to the strongest few , so a stream costs a fraction of scoring every probe . "
).split()
TOKENS = 160


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo pack and a trace of it, a config that watches two root concepts (so that some
    tokens raise alerts), and a text for each token."""
    d = tmp_path_factory.mktemp("demo")
    cli("pack", "synth", "--preset", "demo", "--out", d / "pack")
    cli("trace", "synth", "--pack", d / "pack", "--tokens", str(TOKENS), "--out", d / "trace.npy")
    roots = [c.name for c in pc.pack.open(d / "pack").concepts if c.layer == 0][:2]
    config = d / "watch.toml"
    config.write_text(EXACT.read_text() + f'\n[[cascade.watch]]\nname = "demo"\nconcepts = {json.dumps(roots)}\n')
    texts = [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(TOKENS)]
    (d / "texts.json").write_text(json.dumps(texts))
    return {"dir": d, "pack": d / "pack", "trace": np.load(d / "trace.npy"), "config": config, "texts": texts,
            "roots": roots}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: scripts/python-env.sh installs Debian's (make pyenv)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("PROBE_CASCADE_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_page(page, reports, texts) -> None:
    """The page shows every token with its text, tinted by the report's strongest concept,
    alerts where the reports have them; a click shows the report's top concepts and alerts."""
    toks = page.locator("#pc-tokens .tok")
    assert toks.count() == len(reports)
    shown = toks.evaluate_all("ts => ts.map(t => [t.dataset.token, t.dataset.top, t.textContent, t.classList.contains('alert')])")
    want = [[str(r.token), r.top[0].name, texts[k], bool(r.alerts)] for k, r in enumerate(reports)]
    assert shown == want
    alerted = [k for k, r in enumerate(reports) if r.alerts]
    assert alerted, "the watched roots raise alerts on some tokens"
    k = alerted[len(alerted) // 2]
    toks.nth(k).click()
    names = page.locator("#pc-detail tr.concept").evaluate_all("rs => rs.map(r => r.dataset.name)")
    assert names == [d.name for d in reports[k].top]
    assert page.locator("#pc-detail .alerts li").evaluate_all("ls => ls.map(l => l.dataset.concept)") == [
        a.concept for a in reports[k].alerts
    ]
    # The top concept's path is its ancestors' names.
    path = page.locator("#pc-detail tr.concept .path").first.get_attribute("title")
    assert path == " › ".join(reports[k].top[0].path[:-1])
    # Sparklines: the watched roots, then the strongest concepts of the window.
    sparks = page.locator("#pc-lines .spark").evaluate_all("ss => ss.map(s => s.dataset.name)")
    assert len(sparks) >= 3 and set(a.watched for r in reports for a in r.alerts) <= set(sparks)
    # Clicking a sparkline shades every token by that concept: unshaded where it was not
    # reported, shaded where it was.
    name = sparks[-1]
    page.locator(f'#pc-lines .spark[data-name="{name}"]').click()
    assert page.locator("#pc-tokens").get_attribute("data-mode") == "concept"
    shaded = toks.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor !== 'rgba(0, 0, 0, 0)')")
    assert shaded == [any(d.name == name for d in r.top) for r in reports]
    # By area: tokens whose strongest concepts share a root share a colour.
    page.click('#pc-modes button[data-mode="area"]')
    colours = toks.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor)")
    by_root = {}
    for r, c in zip(reports, colours):
        by_root.setdefault(r.top[0].path[0], set()).add(c)
    assert all(len(c) == 1 for c in by_root.values()), by_root
    page.click('#pc-modes button[data-mode="top"]')


def test_the_live_page_follows_a_session_streamed_through_serve(demo, browser, tmp_path):
    served = Served(demo["pack"], tmp_path, config=demo["config"])
    try:
        with pc.Client(served.grpc) as client, client.session(label="demo trace") as s:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(f"http://{served.http}/#session={s.id}")
            # The page lists the session, and is subscribed once it says it is live.
            page.wait_for_selector(f'#pc-sessions li[data-id="{s.id}"]')
            page.wait_for_function("document.querySelector('#pc-status').textContent.startsWith('live')")
            # The config's watched concepts have sparklines before any token.
            page.wait_for_function(f"document.querySelectorAll('#pc-lines .spark').length === {len(demo['roots'])}")
            assert page.locator("#pc-lines .spark").evaluate_all("ss => ss.map(s => s.dataset.name)") == demo["roots"]
            reports = [s.observe(row, text=demo["texts"][t]) for t, row in enumerate(demo["trace"])]
            page.wait_for_function(f"document.querySelectorAll('#pc-tokens .tok').length >= {TOKENS}", timeout=30_000)
            check_page(page, reports, demo["texts"])
            page.screenshot(path=str(shots(tmp_path) / "viewer-live.png"))
            page.close()
    finally:
        assert served.stop() == 0


def test_the_html_reports_of_run_and_of_python_show_the_same_tokens(demo, browser, tmp_path):
    with pc.Runtime(demo["pack"], config=str(demo["config"])) as rt, rt.session() as s:
        reports = [s.observe(row) for row in demo["trace"]]
    # `probe-cascade run --html`: the same runtime, exact mode, so the same reports.
    html = tmp_path / "run.html"
    cli("run", "--engine", "runtime", "--config", demo["config"], "--pack", demo["pack"], "--trace",
        demo["dir"] / "trace.npy", "--token-text", demo["dir"] / "texts.json", "--html", html)
    page = browser.new_page(viewport={"width": 1400, "height": 860})
    page.goto(html.as_uri())
    check_page(page, reports, demo["texts"])
    page.screenshot(path=str(shots(tmp_path) / "viewer-report.png"))
    # Python's report of the same reports; with the runtime, the concept picker has the pack.
    py = pc.viewer.to_html(tmp_path / "py.html", reports, texts=demo["texts"], runtime=None)
    page.goto(Path(py).as_uri())
    check_page(page, reports, demo["texts"])
    page.close()


def test_the_live_page_asks_for_the_bearer_token_and_sends_it(demo, browser, tmp_path):
    served = Served(demo["pack"], tmp_path, config=demo["config"], token="s3cret")
    try:
        with pc.Client(served.grpc, token="s3cret") as client, client.session(label="guarded") as s:
            page = browser.new_page()
            page.goto(f"http://{served.http}/")
            # Without the token the /v1/ routes answer 401, and the page asks for it.
            page.wait_for_selector("#pc-auth:not([hidden])")
            assert page.locator("#pc-sessions li[data-id]").count() == 0
            page.fill("#pc-token", "s3cret")
            page.click("#pc-auth button")
            page.wait_for_selector(f'#pc-sessions li[data-id="{s.id}"]')
            page.wait_for_function("document.querySelector('#pc-status').textContent.startsWith('live')")
            r = s.observe(demo["trace"][0], text="guarded")
            page.wait_for_selector('#pc-tokens .tok[data-token="0"]')
            assert page.locator("#pc-tokens .tok").first.get_attribute("data-top") == r.top[0].name
            page.close()
    finally:
        assert served.stop() == 0
