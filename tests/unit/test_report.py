"""Scoring reports: three files, self-contained HTML with plots, escaped texts, terminal-readable markdown."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from common.core import report
from common.core.metrics import metrics_by_model_set, score_rows
from common.core.report import write_report

TITLE = "Fine-tune check · 微调评估"
EXTRA = {
    "Decoding · 解码设置": {"beam_size": 5, "prompt": "请把这段语音转录成文本。", "note": "<b>bold</b>"},
    "Notes · 备注": "line one\nline <two>",
    "Runs · 运行": [{"stage": "evaluate", "seconds": 12.5}, {"stage": "finetune", "gpu": "H100"}],
}


def _rows(models: tuple[str, ...] = ("whisper-base", "whisper-base-ft")) -> list[dict]:
    pairs = [
        ("hsk", "u1", "今天天气很好", ["今天天器很好", "今天天气很好"]),
        ("hsk", "u2", "我用 iPhone 打电话", ["我用爱疯打电话", "我用 iphone 打电话"]),
        ("hsk", "u3", "你好", ["你好吗谢谢观看谢谢观看", "你好"]),  # baseline CER 4.5: beyond the plot cap
        ("real", "r1", "北京是中国的首都", ["<script>alert(1)</script>", "北京是中国首都"]),
        ("real", "r2", "這是一個篇章", ["这是一个篇章", "这是一个文章"]),
    ]
    return [
        {
            "id": utt,
            "reference": ref,
            "hypothesis": hyps[i],
            "model": model,
            "set": name,
            "duration": 2.0,
            "decode_seconds": 0.3 + 0.1 * i,
        }
        for i, model in enumerate(models)
        for name, utt, ref, hyps in pairs
    ]


def _write(
    out: Path, models: tuple[str, ...] = ("whisper-base", "whisper-base-ft"), extra: dict | None = None
) -> dict:
    scored = score_rows(_rows(models))
    metrics = metrics_by_model_set(scored)
    paths = write_report(out, metrics, scored, TITLE, extra)
    return {
        "paths": paths,
        "metrics": metrics,
        **{name: p.read_text(encoding="utf-8") for name, p in paths.items()},
    }


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report")
    return {"out": out, **_write(out, extra=EXTRA)}


def _images(page: str) -> list[str]:
    """The inline SVG plots of a report page."""
    return re.findall(r'<svg role="img" aria-label="[a-z]+" class="plot".*?</svg>', page, flags=re.S)


def test_writes_exactly_the_three_files_atomically(two_models: dict) -> None:
    assert set(two_models["paths"]) == {"metrics.json", "report.md", "report.html"}
    assert sorted(p.name for p in two_models["out"].iterdir()) == ["metrics.json", "report.html", "report.md"]
    written = json.loads(two_models["metrics.json"])
    vs = written["whisper-base-ft"]["hsk"].pop("vs_baseline")  # the comparison with its interval, added
    written["whisper-base-ft"]["real"].pop("vs_baseline")
    assert written == two_models["metrics"]
    assert vs["baseline"] == "whisper-base" and vs["ci95_low"] <= vs["delta_cer"] <= vs["ci95_high"]


def test_html_embeds_its_plots_as_inline_svg_with_text_labels(two_models: dict) -> None:
    images = _images(two_models["report.html"])
    assert len(images) == 3  # CER bars, per-utterance distribution, baseline-vs-fine-tuned scatter
    labels = [re.findall(r"<text[^>]*>([^<]*)</text>", svg) for svg in images]
    assert all(labels) and "whisper-base" in labels[0]  # names are text, not paths of glyph outlines
    assert all("Noto Sans CJK SC" in svg and "sans-serif" in svg for svg in images)  # the browser's fonts
    ids = re.findall(r' id="([^"]+)"', "".join(images))
    assert len(ids) == len(set(ids))  # three plots in one page: no clashing clip-path ids


@pytest.mark.parametrize("pattern", [r"https?://", r"<link\b", r"<script\b", r"@import", r"url\((?!#)"])
def test_html_is_self_contained(two_models: dict, pattern: str) -> None:
    assert re.search(pattern, two_models["report.html"], flags=re.IGNORECASE) is None


@pytest.mark.parametrize(
    "escaped",
    [
        "&lt;script&gt;alert(1)&lt;/script&gt;",  # raw hypothesis of the worst baseline utterance
        "&lt;b&gt;bold&lt;/b&gt;",  # an extra-section value
        "line &lt;two&gt;",
    ],
)
def test_html_escapes_texts(two_models: dict, escaped: str) -> None:
    assert escaped in two_models["report.html"]


@pytest.mark.parametrize(
    "expected",
    [
        "Character error rate per set · 各测试集字错率 (CER)",
        "Worst utterances · 错误最多的语句: whisper-base-ft",
        "Comparison with the baseline · 与基线对比 (whisper-base)",
        "Decoding · 解码设置",
        "请把这段语音转录成文本。",
        "finetune",
    ],
)
def test_html_has_sections(two_models: dict, expected: str) -> None:
    assert expected in two_models["report.html"]


def test_markdown_has_the_metrics_table(two_models: dict) -> None:
    md = two_models["report.md"]
    metrics = two_models["metrics"]
    assert "## Metrics · 指标" in md
    for model, sets in metrics.items():
        for name, m in sets.items():
            row = next(
                line for line in md.splitlines() if line.startswith(f"| {model} ") and f"| {name} " in line
            )
            assert f"{100 * m['cer']:.2f}%" in row
    assert "REF 参考: 北京是中国的首都" in md and "HYP 识别: <script>alert(1)</script>" in md


def test_markdown_tables_line_up_in_a_terminal(two_models: dict) -> None:
    blocks = re.findall(r"(?:^\|.*\n)+", two_models["report.md"], flags=re.MULTILINE)
    assert len(blocks) == 4  # comparison, metrics, two extra sections
    for block in blocks:
        lines = block.splitlines()
        assert len({report._width(line) for line in lines}) == 1, block  # CJK characters count double
        assert len(lines) >= 3


def test_comparison_counts_utterances(two_models: dict) -> None:
    md = two_models["report.md"]
    # hsk: fine-tuned is better on u1, u2, u3 → 3/0/0; real: better on r1, worse on r2 → 1/0/1
    assert re.search(r"\| whisper-base-ft \| hsk .*\| +3/0/0 \|", md)
    assert re.search(r"\| whisper-base-ft \| real .*\| +1/0/1 \|", md)


def test_one_model_has_no_scatter(tmp_path: Path) -> None:
    result = _write(tmp_path, models=("only",))
    assert len(_images(result["report.html"])) == 2
    assert "与基线对比" not in result["report.html"]


def test_without_cjk_font_chinese_names_are_plot_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No CJK font on the machine making the report: Chinese names are still SVG text (the browser draws
    them), not aliases, and matplotlib's missing-glyph warnings stay out of the log."""
    monkeypatch.setattr(report, "_cjk_font_entry", lambda: None)
    assert report.drawable("whisper-base") and not report.drawable("基线模型")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _write(tmp_path, models=("基线模型", "whisper-base-ft"))
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert "Plot labels" not in result["report.html"]
    assert any("基线模型" in re.findall(r"<text[^>]*>([^<]*)</text>", svg) for svg in _images(result["report.html"]))
    assert "基线模型" in result["report.md"]


def test_cjk_font_when_present_draws_chinese() -> None:
    if report.cjk_font() is None:
        assert not report.drawable("字错率")
    else:
        assert report.drawable("字错率 whisper")


def test_every_comparison_has_an_interval_and_the_report_opens_with_the_answers(tmp_path):
    """Domain = the first set, general speech = the others; the guard's choice (finetune's guard.json) joins."""
    guard = {"chosen": "merge-enc0.8-dec1", "met_tolerance": True, "tolerance_points": 1.0, "guard_set": "general",
             "reason": "merge-enc0.8-dec1: the lowest domain-slice CER", "pretrained": {"domain_cer": 1.5,
                                                                                       "guard_cer": 0.2},
             "candidates": [{"name": "merge-enc0.8-dec1", "domain_cer": 0.2, "guard_cer": 0.205, "passes": True,
                             "guard_delta": {"delta": 0.005, "low": -0.004, "high": 0.009, "n": 30,
                                             "verdict": "no significant difference"}}]}
    scored = score_rows(_rows())
    paths = write_report(tmp_path, metrics_by_model_set(scored), scored, TITLE, guard=guard)
    md, page = paths["report.md"].read_text(), paths["report.html"].read_text()
    answers = md.split("## Answers · 结论")[1].split("## ")[0]
    assert "Better on your domain?" in answers and "hsk" in answers  # the first set
    assert "Worse on general speech?" in answers and "real" in answers
    assert "final/ = merge-enc0.8-dec1" in answers and "+0.50 pp" in answers and "within the tolerance" in answers
    assert "95 % CI" in answers
    assert "Forgetting guard" in md and "merge-enc0.8-dec1" in page and "<strong>" in page
    metrics = json.loads(paths["metrics.json"].read_text())
    for name in ("hsk", "real"):
        vs = metrics["whisper-base-ft"][name]["vs_baseline"]
        assert vs["verdict"] in ("better", "worse", "no significant difference")
        assert vs["ci95_low"] <= vs["delta_cer"] <= vs["ci95_high"] and "bootstrap" in vs["method"]
    assert "vs_baseline" not in metrics["whisper-base"]["hsk"]  # the baseline is not compared with itself


def test_a_set_that_chose_settings_is_labelled_a_development_number(tmp_path):
    scored = score_rows(_rows())
    paths = write_report(tmp_path, metrics_by_model_set(scored), scored, TITLE, development=["real"])
    answers = paths["report.md"].read_text().split("## Answers · 结论")[1].split("## ")[0]
    lines = {line.split("?")[0]: line for line in answers.splitlines() if line.startswith("- ")}
    assert "development number" in lines["- Worse on general speech"]  # real
    assert "development number" not in lines["- Better on your domain"]  # hsk chose nothing
    assert "development number" in paths["report.html"].read_text()
