"""Scoring reports: ``metrics.json``, ``report.md`` (terminal-readable) and a self-contained ``report.html``.

The HTML has no external assets: CSS is inline and plots are inline SVG (matplotlib) whose labels
are SVG text, drawn by the browser with the page's fonts: Chinese model and set names show as
they are without any font on the machine that made the report (matplotlib lays them out with
DejaVu Sans, or an installed CJK font when there is one, :func:`cjk_font`). Every text that comes
from data (ids, model names, transcripts) is escaped. Plots never draw transcripts.

The first model in ``metrics`` is the baseline that the others are compared with (evaluate
puts the pretrained model first).
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import io
import json
import logging
import re
import shutil
import subprocess
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jiwer
import matplotlib
import numpy as np
from matplotlib import font_manager, ft2font
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from common.core.bootstrap import METHOD, compare
from common.core.metrics import with_errors
from common.core.store import atomic_write_bytes

log = logging.getLogger(__name__)

WORST_N = 10  # utterances listed per model
PLOT_DPI = 100  # a 10-inch-wide figure is 1000 px: fits the 1100 px page without scaling
CER_AXIS_CAP = 1.0  # per-utterance CER above 100% (runaway insertions) is drawn at the cap, as a triangle
BASE_FONT = "DejaVu Sans"  # ships with matplotlib, so it is always there
# Preferred CJK fonts, best first; any other installed font with CJK glyphs is used after them.
PREFERRED_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Source Han Sans SC",
    "Noto Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "PingFang SC",
    "SimHei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
)

# The metrics table: (key, heading, kind).
COLUMNS = (
    ("n", "Utterances · 句数", "int"),
    ("cer", "CER · 字错率", "pct"),
    ("wer", "WER · 词错率", "pct"),
    ("exact", "Exact · 完全正确率", "pct"),
    ("similarity", "Similarity · 相似度", "pct"),
    ("audio_seconds", "Audio · 时长 (s)", "sec"),
    ("rtf", "RTF · 实时率", "ratio"),
)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def write_report(
    out_dir: Path,
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
    scored_rows: Sequence[Mapping[str, Any]],
    title: str,
    extra: Mapping[str, Any] | None = None,
    *,
    worst_n: int = WORST_N,
    roles: Mapping[str, str] | None = None,
    guard: Mapping[str, Any] | None = None,
    development: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``report.html`` into ``out_dir`` (each atomically).

    ``metrics`` is :func:`common.core.metrics.score_predictions`'s ``{model: {set: {...}}}``;
    ``scored_rows`` are the prediction rows (scored by :func:`common.core.metrics.score_rows`, or
    raw rows that are scored here). ``extra`` adds sections after the results: ``{heading:
    value}`` where value is a string (a paragraph), a mapping (a key/value table) or a list of
    mappings (a table). Returns ``{"metrics.json": path, "report.md": path, "report.html": path}``.

    Every model after the first gets, per set, ``vs_baseline`` in metrics.json: the CER difference with its
    paired-bootstrap 95 % interval and verdict (common.core.bootstrap). ``roles`` ({set: "domain" | "general"};
    default: the first set is the domain, the others general speech) and ``guard`` (finetune's guard.json)
    make the report's opening answers: better on the domain? worse on general speech? The sets named in
    ``development`` chose something, and their answers say that their numbers are development numbers.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [with_errors(r) for r in scored_rows]
    extra = dict(extra or {})
    figures = render_figures(metrics, rows)
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    comparisons = _comparisons(metrics, rows)
    answers = _answers(comparisons, _sets(metrics), roles, guard, development)
    if guard:
        extra[GUARD_HEADING] = _guard_table(guard)
    docs = {
        "metrics.json": json.dumps(_with_intervals(metrics, comparisons), ensure_ascii=False, indent=2,
                                   allow_nan=False) + "\n",
        "report.md": _markdown(title, generated, metrics, rows, extra, worst_n, answers),
        "report.html": _html(title, generated, metrics, rows, extra, figures, worst_n, answers),
    }
    paths = {}
    for name, text in docs.items():
        paths[name] = out_dir / name
        atomic_write_bytes(paths[name], text.encode("utf-8"))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


# ---------------------------------------------------------------------------------------------
# Shared helpers: comparisons, worst utterances, number formatting
# ---------------------------------------------------------------------------------------------


def _models(metrics: Mapping[str, Any]) -> list[str]:
    return list(metrics)


def _sets(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for sets in metrics.values():
        seen.update(dict.fromkeys(sets))
    return list(seen)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "sec":
        return f"{value:,.1f}"
    if kind == "ratio":
        return f"{value:.3f}"
    return str(value)


def _paired_cers(
    rows: Sequence[Mapping[str, Any]], baseline: str, model: str
) -> list[tuple[str, float, float]]:
    """(set, baseline CER, model CER) for every utterance both models transcribed."""
    base = {(str(r["set"]), str(r["id"])): r["cer"] for r in rows if str(r["model"]) == baseline}
    return [
        (str(r["set"]), base[key], r["cer"])
        for r in rows
        if str(r["model"]) == model and (key := (str(r["set"]), str(r["id"]))) in base
    ]


def _win_counts(pairs: Sequence[tuple[str, float, float]]) -> tuple[int, int, int]:
    """(better, same, worse) utterances for the second model of the pairs."""
    eps = 1e-9
    better = sum(m < b - eps for _, b, m in pairs)
    worse = sum(m > b + eps for _, b, m in pairs)
    return better, len(pairs) - better - worse, worse


def _comparisons(
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per (other model, set) against the baseline (first model)."""
    models = _models(metrics)
    if len(models) < 2:
        return []
    baseline, out = models[0], []
    for model in models[1:]:
        for name, m in metrics[model].items():
            b = metrics[baseline].get(name)
            if b is None:
                continue
            pairs = [p for p in _paired_cers(rows, baseline, model) if p[0] == name]
            better, same, worse = _win_counts(pairs)
            interval = compare(rows, baseline, model, name)
            delta = m["cer"] - b["cer"] if m["cer"] is not None and b["cer"] is not None else None
            relative = delta / b["cer"] if delta is not None and b["cer"] else None
            out.append(
                {
                    "baseline": baseline,
                    "model": model,
                    "set": name,
                    "base_cer": b["cer"],
                    "cer": m["cer"],
                    "delta": delta,
                    "relative": relative,
                    "better": better,
                    "same": same,
                    "worse": worse,
                    "interval": interval,
                }
            )
    return out


def _with_intervals(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    comparisons: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """metrics with ``vs_baseline`` (Δ CER, 95 % interval, verdict) added to every compared model and set."""
    out = {model: {name: dict(m) for name, m in sets.items()} for model, sets in metrics.items()}
    for c in comparisons:
        ci = c["interval"]
        out[c["model"]][c["set"]]["vs_baseline"] = {
            "baseline": c["baseline"], "delta_cer": c["delta"],
            **({"ci95_low": ci.low, "ci95_high": ci.high, "verdict": ci.verdict, "utterances": ci.n,
                "method": METHOD} if ci else {"verdict": None}),
        }
    return out


def _ci_text(c: Mapping[str, Any]) -> tuple[str, str]:
    """('[-15.10, -9.80] pp', 'better') for a comparison, dashes without an interval."""
    ci = c.get("interval")
    if ci is None:
        return "—", "—"
    return f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}] pp", ci.verdict


GUARD_HEADING = "Forgetting guard: how final/ was chosen · 遗忘防护: 最终模型如何选出"
DOMAIN, GENERAL = "domain", "general"
DEVELOPMENT_NOTE = " This set chose settings, so this is a development number, not proof · 该集参与了选择, 这是开发集数字。"


def _answers(comparisons: Sequence[Mapping[str, Any]], sets: Sequence[str], roles: Mapping[str, str] | None,
             guard: Mapping[str, Any] | None, development: Sequence[str] = ()) -> list[str]:
    """The report's opening lines: better on the domain? worse on general speech? (with the intervals)."""
    if not comparisons:
        return []
    roles = dict(roles or {})
    for i, name in enumerate(sets):
        roles.setdefault(name, DOMAIN if i == 0 else GENERAL)
    lines = []

    def said(c: Mapping[str, Any]) -> str:
        ci = c.get("interval")
        span = f" (95 % CI {100 * ci.low:+.2f} … {100 * ci.high:+.2f} pp, {ci.n} utterances)" if ci else ""
        delta = "—" if c["delta"] is None else f"{100 * c['delta']:+.2f} pp"
        return f"{c['model']} on {c['set']}: CER {_fmt(c['base_cer'], 'pct')} → {_fmt(c['cer'], 'pct')}, {delta}{span}"

    for c in comparisons:
        verdict = c["interval"].verdict if c.get("interval") else None
        if roles.get(c["set"]) == DOMAIN:
            answer = {"better": "Yes", "worse": "No, worse", None: "Cannot tell"}.get(verdict, "No significant difference")
            zh = {"better": "是", "worse": "否, 更差", None: "无法判断"}.get(verdict, "无显著差异")
            lines.append(f"Better on your domain? · 在你的领域上更好吗? **{answer} · {zh}** — {said(c)}, "
                         f"{verdict or 'no interval'}.")
        else:
            answer = {"worse": "Yes", "better": "No, better", None: "Cannot tell"}.get(verdict, "No significant change")
            zh = {"worse": "是", "better": "否, 更好", None: "无法判断"}.get(verdict, "无显著变化")
            lines.append(f"Worse on general speech? · 在通用语音上变差了吗? **{answer} · {zh}** — {said(c)}, "
                         f"{verdict or 'no interval'}.")
        if c["set"] in development:
            lines[-1] += DEVELOPMENT_NOTE
    if guard:
        lines.append(_guard_answer(guard))
    return lines


def _guard_answer(guard: Mapping[str, Any]) -> str:
    chosen = guard.get("chosen")
    verdicts = {c["name"]: c for c in guard.get("candidates", [])}
    c = verdicts.get(chosen)
    if c is None or not c.get("guard_delta"):
        return (f"Forgetting guard · 遗忘防护: final/ = {chosen}. {guard.get('reason', '')}")
    g = c["guard_delta"]
    met = ("within" if guard.get("met_tolerance") else "NOT within")
    return (f"Forgetting guard · 遗忘防护 (guard set {guard.get('guard_set')}, {g['n']} utterances; it chose the model, "
            f"so this is a development number): final/ = {chosen}, guard CER "
            f"{_fmt(guard['pretrained']['guard_cer'], 'pct')} → {_fmt(c['guard_cer'], 'pct')}, "
            f"{100 * g['delta']:+.2f} pp (95 % CI {100 * g['low']:+.2f} … {100 * g['high']:+.2f} pp, {g['verdict']}), "
            f"{met} the tolerance of {guard.get('tolerance_points'):g} point(s).")


def _guard_table(guard: Mapping[str, Any]) -> list[dict[str, Any]]:
    pre = guard.get("pretrained", {})
    rows = [{"candidate": "pretrained", "domain-slice CER": _fmt(pre.get("domain_cer"), "pct"),
             "guard CER": _fmt(pre.get("guard_cer"), "pct"), "guard Δ [95 % CI]": "—", "passes": "—",
             "chosen": "yes" if guard.get("chosen") == "pretrained" else ""}]
    for c in guard.get("candidates", []):
        g = c.get("guard_delta")
        rows.append({
            "candidate": c["name"], "domain-slice CER": _fmt(c.get("domain_cer"), "pct"),
            "guard CER": _fmt(c.get("guard_cer"), "pct"),
            "guard Δ [95 % CI]": (f"{100 * g['delta']:+.2f} pp [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}] "
                                  f"{g['verdict']}") if g else "—",
            "passes": "yes" if c.get("passes") else "no", "chosen": "yes" if guard.get("chosen") == c["name"] else ""})
    rows.append({"candidate": "→ choice", "domain-slice CER": "", "guard CER": "", "guard Δ [95 % CI]": "",
                 "passes": "", "chosen": guard.get("reason", "")})
    return rows


def _worst(rows: Sequence[Mapping[str, Any]], model: str, n: int) -> list[Mapping[str, Any]]:
    """The model's ``n`` utterances with the highest CER (ties: more edits first), errors only."""
    mine = [r for r in rows if str(r["model"]) == model and r["char_errors"] > 0]
    mine.sort(key=lambda r: (-r["cer"], -r["char_errors"], str(r["set"]), str(r["id"])))
    return mine[:n]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Fonts and plots
# ---------------------------------------------------------------------------------------------


@functools.cache
def _cjk_font_entry() -> Any:
    """The matplotlib font entry to use for Chinese, or None (logged once)."""

    def rank(entry: Any) -> int:
        return (
            PREFERRED_CJK_FONTS.index(entry.name)
            if entry.name in PREFERRED_CJK_FONTS
            else len(PREFERRED_CJK_FONTS)
        )

    entry = _first_cjk(sorted(font_manager.fontManager.ttflist, key=rank))
    if entry is None and _add_fontconfig_cjk_fonts():
        entry = _first_cjk(sorted(font_manager.fontManager.ttflist, key=rank))
    if entry is None:
        log.info(
            "no CJK font found for plots (install e.g. fonts-noto-cjk); non-ASCII labels get ASCII aliases"
        )
    else:
        log.info("plots use CJK font %r (%s)", entry.name, entry.fname)
    return entry


def _first_cjk(entries: Sequence[Any]) -> Any:
    probe = "字错率中文"
    for entry in entries:
        try:
            font = ft2font.FT2Font(entry.fname)
        except (OSError, RuntimeError, ValueError):
            continue
        glyphs = {font.get_char_index(ord(ch)) for ch in probe}
        # Distinct glyphs, not just any glyph: fallback fonts such as "Last Resort" (shipped with
        # matplotlib) map a whole Unicode block to one placeholder box, which is tofu again.
        if 0 not in glyphs and len(glyphs) == len(probe):
            return entry
    return None


def _add_fontconfig_cjk_fonts() -> bool:
    """Register the Chinese fonts fontconfig knows (``fc-list :lang=zh``) with matplotlib.

    matplotlib caches its font list on first use, so a font installed later is invisible to it
    until the cache is rebuilt; fontconfig sees it at once. Returns True when any was added.
    """
    if shutil.which("fc-list") is None:
        return False
    try:
        listing = subprocess.run(
            ["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("fc-list failed: %s", e)
        return False
    paths = {line.split(":")[0].strip() for line in listing.splitlines() if line.strip()}
    known = {entry.fname for entry in font_manager.fontManager.ttflist}
    added = False
    for path in sorted(paths - known):
        try:
            font_manager.fontManager.addfont(path)
            added = True
        except (OSError, RuntimeError, ValueError) as e:
            log.debug("cannot load font %s: %s", path, e)
    return added


def cjk_font() -> str | None:
    """Name of an installed font that draws Chinese in plots, or None when there is none."""
    entry = _cjk_font_entry()
    return entry.name if entry is not None else None


def _plot_fonts() -> list[str]:
    """Font family list for plots: DejaVu Sans, with the CJK font (if any) as per-glyph fallback."""
    return [BASE_FONT] + ([cjk_font()] if cjk_font() else [])


@functools.cache
def _charmap(family: str) -> frozenset[int]:
    """Code points the installed font ``family`` can draw."""
    path = font_manager.findfont(font_manager.FontProperties(family=[family]), fallback_to_default=False)
    return frozenset(ft2font.FT2Font(path).get_charmap())


def drawable(text: str) -> bool:
    """True when every character of ``text`` has a glyph in the plot fonts (no tofu)."""
    charmaps = [_charmap(family) for family in _plot_fonts()]
    return all(ch.isspace() or any(ord(ch) in cm for cm in charmaps) for ch in text)


def _aliases(names: Sequence[str], prefix: str) -> dict[str, str]:
    """Plot label per name: the name itself when drawable, else ``<prefix><position>``."""
    labels: dict[str, str] = {}
    for i, name in enumerate(names, start=1):
        label = name if drawable(name) else f"{prefix}{i}"
        while label != name and label in names:  # a real model may be called "M1" too
            label += "'"
        labels[name] = label
    return labels


# Fonts the browser draws plot labels with (the page's own stack: CJK fonts of every common system).
SVG_FONTS = ("'DejaVu Sans', system-ui, -apple-system, 'Segoe UI', 'PingFang SC', 'Hiragino Sans GB', "
             "'Microsoft YaHei', 'Noto Sans CJK SC', 'Source Han Sans SC', 'WenQuanYi Micro Hei', sans-serif")
_SVG_FONT_FAMILY = re.compile(r"font-family: [^;\"]*")
_SVG_NAMESPACES = re.compile(r' xmlns(?::xlink)?="[^"]*"')
_SVG_IDS = re.compile(r'( id="| href="#|url\(#)')  # ids and the references to them


def _svg(fig: Figure, key: str) -> str:
    """The figure as an inline ``<svg>`` element: labels are text (svg.fonttype none), ids unique per figure."""
    FigureCanvasAgg(fig)  # attach a canvas: no pyplot, no global backend state
    buf = io.StringIO()
    with warnings.catch_warnings(), matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": key}):
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # the browser draws them
        fig.savefig(buf, format="svg", dpi=PLOT_DPI, bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # no XML declaration or DOCTYPE inside HTML
    text = _SVG_NAMESPACES.sub("", text, count=2)  # inline SVG in HTML needs no namespace declarations
    text = _SVG_FONT_FAMILY.sub(f"font-family: {SVG_FONTS}", text)
    text = _SVG_IDS.sub(lambda m: f'{m.group(1)}{key}-', text)  # ids unique within the page
    return text.replace("<svg ", f'<svg role="img" aria-label="{key}" class="plot" ', 1)


def _model_colors(models: Sequence[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def _capped(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Values clipped at CER_AXIS_CAP, and a mask of those that were clipped."""
    arr = np.asarray(values, dtype=float)
    return np.minimum(arr, CER_AXIS_CAP), arr > CER_AXIS_CAP


def _cer_axis_top(values: Sequence[float]) -> float:
    """Upper limit of a per-utterance CER axis: the largest value, at least 10%, at most the cap."""
    return min(max(max(values, default=0.0), 0.1), CER_AXIS_CAP) * 1.06


def _bars_figure(
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], mlabel: dict[str, str], slabel: dict[str, str]
) -> Figure:
    models, sets = _models(metrics), _sets(metrics)
    colors = _model_colors(models)
    width = 0.8 / len(models)
    fig = Figure(figsize=(min(10.0, max(6.0, 2.5 + 0.9 * len(sets) * len(models))), 4.2))
    ax = fig.add_subplot()
    top = 0.0
    for i, model in enumerate(models):
        xs, heights = [], []
        for j, name in enumerate(sets):
            cer = metrics[model].get(name, {}).get("cer")
            if cer is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(cer)
        bars = ax.bar(xs, heights, width * 0.92, label=mlabel[model], color=colors[model])
        ax.bar_label(bars, labels=[f"{100 * h:.1f}%" for h in heights], padding=2, fontsize=9)
        top = max([top, *heights])
    ax.set_xticks(range(len(sets)), [slabel[s] for s in sets])
    ax.set_ylim(0, max(top * 1.18, 0.05))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_ylabel("corpus CER (lower is better)")
    ax.set_title("Character error rate per test set")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="model", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _distribution_figure(
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    mlabel: dict[str, str],
    slabel: dict[str, str],
) -> Figure:
    """Per set, one box per model with every utterance as a jittered dot."""
    models, sets = _models(metrics), _sets(metrics)
    colors = _model_colors(models)
    ncols = min(len(sets), 3)
    nrows = -(-len(sets) // ncols)
    fig = Figure(
        figsize=(min(10.0, 1.5 + 1.3 * len(models) * ncols + 0.8 * ncols), 3.8 * nrows), layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    jitter = np.random.default_rng(0)  # fixed seed: the same data gives the same picture
    for ax, name in zip(axes.flat, sets, strict=False):
        per_model = [
            [r["cer"] for r in rows if str(r["model"]) == m and str(r["set"]) == name] for m in models
        ]
        top = _cer_axis_top([v for vals in per_model for v in vals])
        for i, (model, values) in enumerate(zip(models, per_model, strict=True)):
            if not values:
                continue
            y, clipped = _capped(values)
            ax.boxplot(
                [y],
                positions=[i],
                widths=0.55,
                showfliers=False,
                medianprops={"color": "black"},
                boxprops={"color": colors[model]},
                whiskerprops={"color": colors[model]},
                capprops={"color": colors[model]},
            )
            x = i + jitter.uniform(-0.18, 0.18, size=len(y))
            ax.scatter(x[~clipped], y[~clipped], s=14, alpha=0.6, color=colors[model], edgecolors="none")
            if clipped.any():
                ax.scatter(
                    x[clipped], np.full(clipped.sum(), CER_AXIS_CAP), s=28, marker="^", color=colors[model]
                )
        ticks = [
            f"{mlabel[m]}\nmean {100 * float(np.mean(v)):.0f}%" if v else f"{mlabel[m]}\n(none)"
            for m, v in zip(models, per_model, strict=True)
        ]
        ax.set_xticks(range(len(models)), ticks, fontsize=9)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_ylim(-0.03 * top, top)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.set_title(f"set: {slabel[name]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in list(axes.flat)[len(sets) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("CER per utterance")
    fig.suptitle(f"Per-utterance CER (dots: utterances; triangles: above {CER_AXIS_CAP:.0%})", fontsize=11)
    return fig


def _scatter_figure(
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    mlabel: dict[str, str],
    slabel: dict[str, str],
) -> Figure | None:
    """Baseline CER (x) against each other model's CER (y), one point per shared utterance."""
    models, sets = _models(metrics), _sets(metrics)
    others = [m for m in models[1:] if _paired_cers(rows, models[0], m)]
    if not others:
        return None
    set_colors = {s: matplotlib.colormaps["Dark2"](i % 8) for i, s in enumerate(sets)}
    fig = Figure(figsize=(4.6 * len(others) + 1.6, 4.8), layout="constrained")
    axes = fig.subplots(1, len(others), squeeze=False)[0]
    for ax, model in zip(axes, others, strict=True):
        pairs = _paired_cers(rows, models[0], model)
        top = _cer_axis_top([v for _, b, m in pairs for v in (b, m)])
        ax.fill_between([0, top], [0, 0], [0, top], color="tab:green", alpha=0.07, linewidth=0)
        ax.plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--")
        for name in sets:
            xs = [b for s, b, _ in pairs if s == name]
            ys = [m for s, _, m in pairs if s == name]
            if xs:
                ax.scatter(
                    np.minimum(xs, CER_AXIS_CAP),
                    np.minimum(ys, CER_AXIS_CAP),
                    s=18,
                    alpha=0.65,
                    color=set_colors[name],
                    edgecolors="none",
                    label=slabel[name],
                )
        better, same, worse = _win_counts(pairs)
        ax.set_title(f"{mlabel[model]}: better {better} · same {same} · worse {worse}", fontsize=10)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.set_xlabel(f"CER {mlabel[models[0]]} (baseline)")
        ax.set_ylabel(f"CER {mlabel[model]}")
        ax.grid(alpha=0.3)
    if len(sets) > 1:  # one legend for all panels, so that a set missing from one panel is still listed
        handles = [
            Line2D([], [], marker="o", linestyle="", color=set_colors[name], label=slabel[name])
            for name in sets
        ]
        fig.legend(handles=handles, title="set", frameon=False, fontsize=8, loc="outside right upper")
    fig.suptitle("Per-utterance CER (shaded, below the diagonal: improved)", fontsize=11)
    return fig


def render_figures(
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The report's plots as ``{"key", "heading", "caption", "png"}``; ``aliases`` lists the ASCII
    stand-ins used for names the plot fonts cannot draw."""
    if not metrics or not rows:
        return []
    models, sets = _models(metrics), _sets(metrics)
    mlabel, slabel = {m: m for m in models}, {s: s for s in sets}  # SVG text: the browser draws any name
    aliases: list[tuple[str, str]] = []
    font_family = _plot_fonts()
    out = []
    with matplotlib.rc_context(
        {"font.family": font_family, "axes.spines.top": False, "axes.spines.right": False}
    ):
        specs = [
            (
                "bars",
                "Character error rate per set · 各测试集字错率 (CER)",
                _bars_figure(metrics, mlabel, slabel),
                "Corpus-level CER (total edits / total reference characters) of each model on each set.",
            ),
            (
                "distribution",
                "Per-utterance CER distribution · 逐句字错率分布",
                _distribution_figure(metrics, rows, mlabel, slabel),
                "Box: quartiles and median of per-utterance CER; whiskers 1.5 IQR; 'mean' is the mean of "
                "per-utterance CERs, which differs from the corpus CER above.",
            ),
        ]
        scatter = _scatter_figure(metrics, rows, mlabel, slabel)
        if scatter is not None:
            specs.append(
                (
                    "scatter",
                    f"Per-utterance comparison with the baseline · 逐句对比 ({models[0]})",
                    scatter,
                    "Each dot is one utterance of the same set and id; below the diagonal the "
                    "model is better than the baseline.",
                )
            )
        for key, heading, fig, caption in specs:
            out.append(
                {"key": key, "heading": heading, "caption": caption, "svg": _svg(fig, key), "aliases": aliases}
            )
    return out


# ---------------------------------------------------------------------------------------------
# Markdown (readable in a terminal: columns padded by display width, CJK counting double)
# ---------------------------------------------------------------------------------------------


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *body]]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [
            " " * (w - _width(c)) + c if r else c + " " * (w - _width(c))
            for c, w, r in zip(row, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _shown(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[bool]:
    """Per entry of COLUMNS whether the metrics table shows it: WER only where some set has words."""
    has_words = any(m.get("wer") is not None for sets in metrics.values() for m in sets.values())
    return [key != "wer" or has_words for key, _, _ in COLUMNS]


def _pick(items: Sequence[Any], metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[Any]:
    """``items`` laid out like the metrics table (model, set, COLUMNS…, S/D/I) minus the hidden columns."""
    keep = [True, True, *_shown(metrics), True]
    return [x for x, k in zip(items, keep, strict=True) if k]


def _metrics_rows(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[list[str]]:
    out = []
    for model, sets in metrics.items():
        for name, m in sets.items():
            sdi = (
                f"{m['char_substitutions']}/{m['char_deletions']}/{m['char_insertions']}"
                if "char_substitutions" in m
                else "—"
            )
            out.append(_pick([model, name, *(_fmt(m.get(k), kind) for k, _, kind in COLUMNS), sdi], metrics))
    return out


SMALL_SET = 100  # utterances: below this a set's CER moves by whole points with a handful of utterances


def _small_sets(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[tuple[str, int]]:
    """(set, utterances) of the sets scored on fewer than SMALL_SET utterances (the largest count per set)."""
    sizes: dict[str, int] = {}
    for sets in metrics.values():
        for name, m in sets.items():
            sizes[name] = max(sizes.get(name, 0), int(m.get("n") or 0))
    return [(name, n) for name, n in sizes.items() if n < SMALL_SET]


def _small_sample_warning(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    small = _small_sets(metrics)
    if not small:
        return ""
    listed = ", ".join(f"{name} ({n} utterance{'s' if n != 1 else ''})" for name, n in small)
    return (f"Small test set · 测试集过小: {listed}. With fewer than {SMALL_SET} utterances one utterance moves "
            "the CER by a point or more, so small differences between models are not evidence; score on a larger "
            f"set before deciding. 少于 {SMALL_SET} 句时, 模型之间的小差异不能说明问题。")


# Short headings for report.md, so that the table fits a terminal.
METRICS_HEADER_MD = (
    "Model",
    "Set",
    "N",
    "CER 字错率",
    "WER 词错率",
    "Exact 全对",
    "Sim. 相似度",
    "Audio s",
    "RTF",
    "S/D/I",
)
COMPARISON_HEADER_MD = (
    "Model",
    "Set",
    "Base CER 基线",
    "CER 字错率",
    "Change 变化",
    "Rel. 相对",
    "Better/same/worse",
    "95% CI",
    "Verdict 结论",
)
METRICS_HEADER = ("Model · 模型", "Set · 测试集", *(h for _, h, _ in COLUMNS), "S/D/I chars · 替换/删除/插入")
COMPARISON_HEADER = (
    "Model · 模型",
    "Set · 测试集",
    "Baseline CER · 基线",
    "CER · 字错率",
    "Change · 变化",
    "Relative · 相对",
    "Better/same/worse · 更好/相同/更差",
    "95 % interval of the change · 变化的95%置信区间",
    "Verdict · 结论",
)


def _comparison_rows(comparisons: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            c["model"],
            c["set"],
            _fmt(c["base_cer"], "pct"),
            _fmt(c["cer"], "pct"),
            "—" if c["delta"] is None else f"{100 * c['delta']:+.2f} pp",
            "—" if c["relative"] is None else f"{100 * c['relative']:+.1f}%",
            f"{c['better']}/{c['same']}/{c['worse']}",
            *_ci_text(c),
        ]
        for c in comparisons
    ]


def _extra_md(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        body = [[str(k), _plain(v)] for k, v in value.items()]
        return _md_table(("Setting · 设置", "Value · 值"), body, (False, False))
    if _is_table(value):
        keys = _table_keys(value)
        return _md_table(keys, [[_plain(r.get(k)) for k in keys] for r in value], [False] * len(keys))
    return "```\n" + json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n```"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return _one_line(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _is_table(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(r, Mapping) for r in value)
    )


def _table_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(map(str, r)))
    return list(keys)


def _markdown(title, generated, metrics, rows, extra, worst_n, answers=()) -> str:
    right = _pick((False, False, *([True] * len(COLUMNS)), True), metrics)
    parts = [f"# {title}", "", f"Generated {generated}. Plots are in report.html.", ""]
    if _small_sample_warning(metrics):
        parts += [f"> **Warning:** {_small_sample_warning(metrics)}", ""]
    if answers:
        parts += ["## Answers · 结论", "", *(f"- {a}" for a in answers), "", CI_NOTE, ""]
    comparisons = _comparisons(metrics, rows)
    if comparisons:
        parts += [
            f"## Comparison with the baseline · 与基线对比 ({_models(metrics)[0]})",
            "",
            _md_table(
                COMPARISON_HEADER_MD,
                _comparison_rows(comparisons),
                (False, False, True, True, True, True, True, True, False),
            ),
            "",
            "Change in percentage points (pp); negative is better. Better/same/worse count utterances. "
            + CI_NOTE,
            "",
        ]
    parts += ["## Metrics · 指标", "", _md_table(_pick(METRICS_HEADER_MD, metrics), _metrics_rows(metrics), right), ""]
    for model in _models(metrics):
        worst = _worst(rows, model, worst_n)
        parts += [f"## Worst utterances · 错误最多的语句: {model}", ""]
        if not worst:
            parts += ["No errors · 全部正确.", ""]
        for i, r in enumerate(worst, start=1):
            parts += [
                f"{i}. `{r['id']}` (set {r['set']}) CER {_fmt(r['cer'], 'pct')}  "
                f"S{r['char_substitutions']} D{r['char_deletions']} I{r['char_insertions']}",
                f"    - REF 参考: {_one_line(r['reference'])}",
                f"    - HYP 识别: {_one_line(r['hypothesis'])}",
            ]
        parts.append("")
    for heading, value in extra.items():
        parts += [f"## {heading}", "", _extra_md(value), ""]
    parts += ["## Definitions · 说明", "", *DEFINITIONS_MD, ""]
    return "\n".join(parts)


CI_NOTE = (
    "Intervals: 95 % paired bootstrap over utterances (the same utterances resampled for both models, corpus "
    "CER recomputed 10,000 times); 'better'/'worse' when the whole interval is below/above zero, else 'no "
    "significant difference'. 置信区间: 对语句做配对自助重采样(bootstrap)得到的95%区间; 整个区间小于/大于0才判定为更好/更差。"
)

DEFINITIONS_MD = (
    "- Texts are normalized before scoring as the Text normalization section says (by default: NFKC "
    "(full-width → half-width), traditional → simplified (OpenCC t2s), punctuation and whitespace removed, "
    "Latin lower-cased, Chinese numerals read as digits on both sides, so 「三个」 = 「3个」).",
    "- CER = (substitutions + deletions + insertions) / reference characters, summed over the set "
    "(corpus level, not the mean of per-utterance CERs); it can exceed 100% with many insertions.",
    "- WER counts each CJK character and each Latin/digit word as one token (mixed error rate); it is "
    "shown only for sets whose references contain Latin/digit words, otherwise it would repeat the CER (the "
    "column is left out when no set has any).",
    "- Exact = share of utterances whose normalized texts are identical. Similarity = max(0, 1 − CER).",
    "- RTF = decoding seconds / audio seconds (below 1 is faster than real time).",
)


# ---------------------------------------------------------------------------------------------
# HTML (self-contained)
# ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","PingFang SC","Hiragino Sans GB","Microsoft YaHei",
"Noto Sans CJK SC","Source Han Sans SC","WenQuanYi Micro Hei",sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px 32px 48px;background:#fff;min-height:100vh}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:32px 0 10px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
.meta{color:#6b7380;font-size:.9em}
main{box-sizing:border-box}
.tw{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.9em;margin:6px 0 4px;width:auto;max-width:100%}
th,td{border:1px solid #e3e6ea;padding:5px 9px;vertical-align:top;text-align:left}
th{background:#f1f3f6;font-weight:600}th,td{overflow-wrap:anywhere}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafbfc}
.good{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}
figure{margin:8px 0 20px}figure svg,figure img{max-width:100%;height:auto;border:1px solid #eef0f3}
.warning{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px}
figcaption,.note{color:#5d6570;font-size:.85em;margin-top:4px}
td.text{white-space:normal;min-width:220px;max-width:420px;word-break:break-all}
.raw{color:#8a919b;font-size:.85em;margin-top:3px}
.sub{background:#fff1c2}.del{background:#ffd6d6;text-decoration:line-through}.ins{background:#d4f5dd}
code{background:#f1f3f6;padding:0 3px;border-radius:3px}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:.85em;white-space:pre-wrap;overflow-wrap:anywhere}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(
    header: Sequence[str], body: Sequence[Sequence[str]], kinds: Sequence[str], *, raw_html: bool = False
) -> str:
    """A table; ``kinds`` per column: "num" (right-aligned), "text" (wraps) or "" (one line).

    Cells are escaped unless ``raw_html`` (then the caller escaped them)."""
    head = "".join(f"<th>{_e(h).replace(' · ', '<br>')}</th>" for h in header)  # Chinese gloss below
    lines = []
    for row in body:
        cells = "".join(
            (f'<td class="{kind}">' if kind else "<td>") + (c if raw_html else _e(c)) + "</td>"
            for c, kind in zip(row, kinds, strict=True)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'


def _aligned_html(ref_norm: str, hyp_norm: str) -> tuple[str, str]:
    """Normalized reference and hypothesis with substitutions, deletions, insertions marked."""
    if not ref_norm and not hyp_norm:
        return "", ""
    chunks = jiwer.process_characters(ref_norm, hyp_norm).alignments[0]
    ref, hyp = [], []
    for c in chunks:
        r, h = _e(ref_norm[c.ref_start_idx : c.ref_end_idx]), _e(hyp_norm[c.hyp_start_idx : c.hyp_end_idx])
        if c.type == "equal":
            ref.append(r)
            hyp.append(h)
        elif c.type == "substitute":
            ref.append(f'<span class="sub">{r}</span>')
            hyp.append(f'<span class="sub">{h}</span>')
        elif c.type == "delete":
            ref.append(f'<span class="del">{r}</span>')
        else:
            assert c.type == "insert", c.type
            hyp.append(f'<span class="ins">{h}</span>')
    return "".join(ref), "".join(hyp)


def _text_cell(marked: str, raw: str, normalized: str) -> str:
    cell = marked or '<span class="note">(empty · 空)</span>'
    if _one_line(raw) != normalized:
        cell += f'<div class="raw">{_e(_one_line(raw))}</div>'
    return cell


def _worst_html(rows: Sequence[Mapping[str, Any]], model: str, worst_n: int) -> str:
    worst = _worst(rows, model, worst_n)
    if not worst:
        return "<p>No errors · 全部正确.</p>"
    body = []
    for i, r in enumerate(worst, start=1):
        ref, hyp = _aligned_html(r["ref_norm"], r["hyp_norm"])
        body.append(
            [
                str(i),
                _e(r["set"]),
                f"<code>{_e(r['id'])}</code>",
                _e(_fmt(r["cer"], "pct")),
                f"{r['char_substitutions']}/{r['char_deletions']}/{r['char_insertions']}",
                _text_cell(ref, r["reference"], r["ref_norm"]),
                _text_cell(hyp, r["hypothesis"], r["hyp_norm"]),
            ]
        )
    header = ("#", "Set · 测试集", "ID", "CER", "S/D/I", "Reference · 参考文本", "Hypothesis · 识别结果")
    table = _html_table(header, body, ("num", "", "", "num", "num", "text", "text"), raw_html=True)
    return table + _WORST_NOTE


_WORST_NOTE = (
    '<p class="note">Normalized texts as scored: <span class="sub">substitution</span> '
    '<span class="del">deletion</span> <span class="ins">insertion</span>; the raw text is shown '
    "in grey when it differs.</p>"
)


def _extra_html(value: Any) -> str:
    if isinstance(value, str):
        return f"<pre>{_e(value)}</pre>" if "\n" in value else f"<p>{_e(value)}</p>"
    if isinstance(value, Mapping):
        return _html_table(
            ("Setting · 设置", "Value · 值"), [[str(k), _plain(v)] for k, v in value.items()], ("", "text")
        )
    if _is_table(value):
        keys = _table_keys(value)
        # plain cells (wrapping anywhere), not "text": its minimum width times many columns overflows the page
        return _html_table(keys, [[_plain(r.get(k)) for k in keys] for r in value], [""] * len(keys))
    return f"<pre>{_e(json.dumps(value, ensure_ascii=False, indent=2, default=str))}</pre>"


def _figure_html(fig: Mapping[str, Any]) -> str:
    note = ""
    if fig["aliases"]:
        note = " Plot labels: " + "; ".join(f"{_e(a)} = {_e(n)}" for a, n in fig["aliases"]) + "."
    return (
        f'<h2>{_e(fig["heading"])}</h2><figure id="plot-{_e(fig["key"])}">{fig["svg"]}'
        f"<figcaption>{_e(fig['caption'])}{note}</figcaption></figure>"
    )


def _delta_cell(c: Mapping[str, Any]) -> str:
    if c["delta"] is None:
        return "—"
    css = "good" if c["delta"] < 0 else "bad" if c["delta"] > 0 else ""
    return f'<span class="{css}">{100 * c["delta"]:+.2f} pp</span>'


def _html(title, generated, metrics, rows, extra, figures, worst_n, answers=()) -> str:
    body = [f"<h1>{_e(title)}</h1>", f'<p class="meta">Generated {_e(generated)}</p>']
    if _small_sample_warning(metrics):
        body.append(f'<p class="warning" id="small-sample">{_e(_small_sample_warning(metrics))}</p>')
    if answers:
        items = "".join("<li>" + re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(a)) + "</li>" for a in answers)
        body += ["<h2>Answers · 结论</h2>", f"<ul>{items}</ul>", f'<p class="note">{_e(CI_NOTE)}</p>']
    comparisons = _comparisons(metrics, rows)
    if comparisons:
        cells = _comparison_rows(comparisons)
        for row, c in zip(cells, comparisons, strict=True):
            row[:] = [_e(x) for x in row]
            row[4] = _delta_cell(c)
        body += [
            f"<h2>Comparison with the baseline · 与基线对比 ({_e(_models(metrics)[0])})</h2>",
            _html_table(COMPARISON_HEADER, cells, ("", "", "num", "num", "num", "num", "num", "num", ""),
                        raw_html=True),
            '<p class="note">Change in percentage points (pp); negative is better. '
            f"Better/same/worse count utterances by their own CER. {_e(CI_NOTE)}</p>",
        ]
    body += [
        "<h2>Metrics · 指标</h2>",
        _html_table(_pick(METRICS_HEADER, metrics), _metrics_rows(metrics),
                    _pick(("", "", *(["num"] * len(COLUMNS)), "num"), metrics)),
    ]
    body += [_figure_html(f) for f in figures]
    for model in _models(metrics):
        body += [
            f"<h2>Worst utterances · 错误最多的语句: {_e(model)}</h2>",
            _worst_html(rows, model, worst_n),
        ]
    for heading, value in extra.items():
        body += [f"<h2>{_e(heading)}</h2>", _extra_html(value)]
    body += [
        "<h2>Definitions · 说明</h2><ul>" + "".join(f"<li>{_e(d[2:])}</li>" for d in DEFINITIONS_MD) + "</ul>"
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
