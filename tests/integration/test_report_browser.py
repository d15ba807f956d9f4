"""report.html rendered by a real browser (headless Chromium, the Debian package `make setup` installs): at a
1280-px window nothing overflows sideways, the plots' Chinese labels are drawn as distinct glyphs, every section
is there, the WER column is left out for Chinese-only sets and a small test set gets its warning.

The page is loaded with an inline script appended that measures the layout and writes the numbers into the DOM;
`chromium --headless --dump-dom` prints that DOM."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from common.core.metrics import metrics_by_model_set, score_rows
from common.core.report import write_report

WINDOW = (1280, 1000)
MODELS = ("基线 whisper-base", "微调 whisper-base-ft")
SETS = ("普通话测试", "real-zh-dev")
REFS = ["今天天气很好", "请把门关上", "我喜欢学习中文", "北京是中国的首都"]
HYPS = {MODELS[0]: ["今天天汽很好", "请把门关", "我喜欢学习中闻", "北京是中国首都"], MODELS[1]: REFS}

MEASURE = r"""
<script>
(function () {
  const main = document.querySelector('main').getBoundingClientRect();
  const tables = [...document.querySelectorAll('table')].map(t => {
    const box = t.getBoundingClientRect();
    return {right: box.right, fits: t.parentElement.scrollWidth <= t.parentElement.clientWidth + 1,
            heads: [...t.querySelectorAll('th')].map(h => h.textContent)};
  });
  const cjk = /[\u4e00-\u9fff]/;
  const labels = [...document.querySelectorAll('svg.plot text')].filter(t => cjk.test(t.textContent)).map(t => {
    const box = t.getBoundingClientRect(), svg = t.ownerSVGElement.getBoundingClientRect();
    return {text: t.textContent, width: box.width, inside: box.left >= svg.left - 1 && box.right <= svg.right + 1,
            font: getComputedStyle(t).fontFamily};
  });
  // Each distinct Chinese character of the labels drawn alone in the labels' font: real glyphs differ from
  // one another, missing-glyph boxes (tofu) are all alike.
  const chars = [...new Set(labels.map(l => l.text).join('').match(/[\u4e00-\u9fff]/g) || [])].slice(0, 8);
  const canvas = document.createElement('canvas'); canvas.width = 48; canvas.height = 48;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const bitmaps = chars.map(ch => {
    ctx.clearRect(0, 0, 48, 48); ctx.font = '40px ' + (labels[0] ? labels[0].font : 'sans-serif');
    ctx.fillText(ch, 2, 40);
    const data = ctx.getImageData(0, 0, 48, 48).data; let h = 0;
    for (let i = 3; i < data.length; i += 4) h = (h * 31 + data[i]) >>> 0;
    return h;
  });
  const out = {
    innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth, mainRight: main.right,
    tables: tables, labels: labels, chars: chars, bitmaps: bitmaps,
    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
    warning: (document.getElementById('small-sample') || {}).textContent || null,
  };
  const pre = document.createElement('pre'); pre.id = 'measurements'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "headless Chromium is needed for this test: `make setup` installs the Debian package chromium"
    return found


def rendered(page: Path, tmp_path: Path) -> dict:
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", probe.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="measurements">(.*?)</pre>', done.stdout, flags=re.S)
    assert found, f"no measurements in Chromium's DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    rows = [{"id": f"u{i}", "reference": ref, "hypothesis": HYPS[m][i], "model": m, "set": s,
             "duration": 2.0 + i, "decode_seconds": 0.4}
            for m in MODELS for s in SETS for i, ref in enumerate(REFS)]
    scored = score_rows(rows)
    long_path = "/mnt/artifacts/runs/exp-2026-12-07-very-long-run-name/export/ct2-int8-float16-for-cpu-decoding"
    extra = {  # the wide tables evaluate writes: long paths and many columns
        "Throughput · 吞吐量": [{"model": m, "set": s, "utterances": 4, "audio_seconds": 14.0,
                                "decode_seconds": 1.6, "rtf": 0.114, "utterances_per_second": 2.5,
                                "tokens_per_second": 41.7, "batch_size": 8, "device": "cpu",
                                "compute_type": "float32", "engine": "ctranslate2"} for m in MODELS for s in SETS],
        "Models · 模型": [{"model": m, "ref": f"hf://openai/whisper-base?revision={'0' * 40}",
                          "loaded_from": long_path + "/" + m, "conversion": "ct2 (float32)", "load_seconds": 1.2}
                         for m in MODELS],
        "Rejected rows (not scored) · 被拒行(未计分)": [{"set": SETS[0], "line": 7, "row": "x" * 300,
                                                      "reason": "missing_file", "message": "no audio " * 40}],
    }
    out = tmp_path_factory.mktemp("browser")
    return write_report(out, metrics_by_model_set(scored), scored, "ASR evaluation · 语音识别评估", extra)["report.html"]


@pytest.fixture(scope="module")
def measured(page, tmp_path_factory) -> dict:
    return rendered(page, tmp_path_factory.mktemp("chromium"))


def test_nothing_overflows_sideways_at_1280_px(measured):
    assert measured["innerWidth"] == WINDOW[0]
    assert measured["scrollWidth"] <= measured["innerWidth"]  # no horizontal scroll bar on the page
    assert len(measured["tables"]) >= 5
    for table in measured["tables"]:
        assert table["fits"], table["heads"]  # no table needs its own scroll bar either
        assert table["right"] <= measured["mainRight"] + 1, table["heads"]


def test_plot_labels_are_chinese_glyphs(measured):
    texts = {label["text"] for label in measured["labels"]}
    assert {*MODELS, SETS[0]} <= texts  # names drawn as they are: no ASCII aliases
    assert all(label["width"] > 0 and label["inside"] for label in measured["labels"])
    assert len(measured["chars"]) >= 6
    assert len(set(measured["bitmaps"])) == len(measured["chars"])  # distinct glyphs, not tofu boxes


def test_every_section_is_there(measured):
    headings = " | ".join(measured["headings"])
    for expected in ("Comparison with the baseline", "Metrics · 指标", "Character error rate per set",
                     "Per-utterance CER distribution", "Per-utterance comparison with the baseline",
                     f"Worst utterances · 错误最多的语句: {MODELS[0]}", "Throughput · 吞吐量", "Models · 模型",
                     "Rejected rows", "Definitions · 说明"):
        assert expected in headings


def test_wer_hidden_without_words_and_a_small_sample_warning(measured):
    metrics_table = next(t for t in measured["tables"] if any("Utterances" in h for h in t["heads"]))
    assert any("CER" in h for h in metrics_table["heads"])
    assert not any("WER" in h for h in metrics_table["heads"])  # Chinese only: WER would repeat the CER
    assert measured["warning"] and "普通话测试 (4 utterances)" in measured["warning"]
