"""The ``factory run`` HTML report renders in a real browser, every chart loaded (headless Chromium, no Ray).

The report is built from figures this test measures: a tiny GPT trained for a few steps (the loss curve),
timed generate calls (the latency histogram), the stages' real durations, and the CPU-seconds of those
stages priced with the shipped price book (cost by tenant). Chromium comes from
tests/tools/ensure_chromium.sh (``make test`` runs it); without it the browser test skips, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from aifactory.pipeline.report import ReportData, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the report beside it (same folder, same relative image paths): once the page has
# loaded, it writes each image's load status into the DOM, which --dump-dom then prints.
_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                 width: i.naturalWidth, height: i.naturalHeight}));
  const out = document.createElement('pre'); out.id = 'image-probe'; out.textContent = JSON.stringify(imgs);
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def measured() -> ReportData:
    """Measured once for the module; each test gets a copy it may change."""
    return _measured_report()


def _copy(data: ReportData) -> ReportData:
    import copy

    return copy.deepcopy(data)


def _measured_report() -> ReportData:
    import torch
    import torch.nn.functional as F

    from aifactory.cost.kpis import cost_rows
    from aifactory.cost.pricebook import load_price_book
    from aifactory.cost.records import Resource, UsageRecord
    from aifactory.models.gpt import GPT, GPTConfig

    stages, cpu_s = [], {}
    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=32, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (16, cfg.seq_len + 1))
    val = torch.randint(0, 256, (4, cfg.seq_len + 1))
    curve, window = [], []
    t0, c0 = time.monotonic(), time.process_time()
    for step in range(1, 9):
        x = data  # the whole batch: enough CPU-seconds that the cost chart's bars survive the micro-dollar rounding
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % 2 == 0:
            with torch.no_grad():
                v = F.cross_entropy(model(val[:, :-1]).reshape(-1, cfg.vocab_size), val[:, 1:].reshape(-1))
            curve.append({"step": step, "train_loss": sum(window) / len(window), "val_loss": v.item()})
            window.clear()
    stages.append({"name": "train", "status": "ok", "seconds": round(time.monotonic() - t0, 3), "result": ""})
    cpu_s["research"] = time.process_time() - c0

    latencies = []
    t0, c0 = time.monotonic(), time.process_time()
    model.eval()
    for i in range(20):
        t = time.perf_counter()
        model.generate(torch.tensor([[65 + i % 20]]), 32)
        latencies.append((time.perf_counter() - t) * 1e3)
    stages.append({"name": "serve", "status": "ok", "seconds": round(time.monotonic() - t0, 3), "result": ""})
    stages.append({"name": "bench", "status": "skipped", "seconds": 0.0, "result": ""})
    cpu_s["search"] = time.process_time() - c0

    now = time.time()
    records = [UsageRecord(window_start=now - 60, window_end=now, tenant=t, resource=Resource.CPU, sku="cpu",
                           quantity_s=s) for t, s in cpu_s.items()]
    rows = cost_rows(records, load_price_book(), by="tenant")
    assert all(r["cost_usd"] > 0 for r in rows)  # real usage, priced: the chart has bars to draw
    return ReportData(title="factory run (test)", stages=stages, loss_curve=curve, latencies_ms=latencies,
                      cost_rows=[{"tenant": r["tenant"], "cost_usd": r["cost_usd"]} for r in rows],
                      facts={"tenant": "demo"})


def test_report_writes_every_chart_and_the_figures(tmp_path, measured):
    data = _copy(measured)
    path = write_report(data, tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == ["cost_by_tenant.png", "latency.png", "loss.png", "stages.png"]
    for name in images:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["loss_curve"] == data.loss_curve
    assert "unavailable" not in page


def test_a_missing_figure_is_named_not_drawn_empty(tmp_path, measured):
    data = _copy(measured)
    write_report(data, tmp_path)
    data.latencies_ms = []  # as after a failed serve stage, written over an earlier report
    page = write_report(data, tmp_path).read_text()
    assert "latency.png" not in page and "unavailable: no latencies" in page
    assert not (tmp_path / "latency.png").exists()


def _chromium_dom(html_path: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="aif-chromium-") as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--allow-file-access-from-files", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
             "--dump-dom", html_path.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: run tests/tools/ensure_chromium.sh (make test does)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path, measured):
    write_report(_copy(measured), tmp_path)
    probe = tmp_path / "report-probe.html"
    probe.write_text((tmp_path / "report.html").read_text().replace("</body>", _PROBE + "</body>"))
    dom = _chromium_dom(probe)
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not finish loading: {dom[:500]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) == 4
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
