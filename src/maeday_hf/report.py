"""Tables and figures of the paper's protocol (Sec. 4) from finished unit records: Tables 1/2/3, Figs. 2/3.

A *record* is what the protocol writes per unit (`RESULTS/units/<category>/<unit>.json`): `category`, `method`,
`shots`, `shot_seed`, `study` (`"main"` or `"repetitions"`), `num_masks`, `mask_schedule` and `metrics`
(`image_roc_auc`, `image_f1_max`, and with masks `pixel_roc_auc`, `pixel_f1_max`, `aupro`), all in [0, 1].

Aggregation, laid out as the paper's tables:

- a cell is the mean ± standard deviation over shot seeds of one category, method and number of shots, in percent
  with one decimal; a single seed (zero-shot) shows the mean alone. The paper says only "mean±std over 3 runs"; the
  std here is the population one (`ddof=0`), this package's choice (the sample std, `ddof=1`, is 1.22x larger for 3
  seeds);
- a "Mean (...)" row is the mean over its categories of the per-category means (no ± , as in the paper).

Figures need matplotlib (`pip install "maeday-hf[plots]"`); it is imported only when a figure is drawn, and through
`matplotlib.figure.Figure` (no pyplot), so no global backend is touched.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import FOD_CONFIGS, MVTEC_OBJECTS, MVTEC_TEXTURES
from .synthetic import OBJECT_CATEGORIES as SYNTHETIC_OBJECTS
from .synthetic import TEXTURE_CATEGORIES as SYNTHETIC_TEXTURES
from .atomic_io import write_atomically

METHODS: tuple[str, ...] = ("maeday", "patchcore", "2xpatchcore", "maeday+patchcore")
"""Methods a unit can hold: MAEDAY, one PatchCore, the 2×PatchCore ensemble, the MAEDAY+PatchCore ensemble."""

METHOD_LABELS: dict[str, str] = {
    "maeday": "MAEDAY",
    "patchcore": "PC",
    "2xpatchcore": "2×PC",
    "maeday+patchcore": "MAEDAY+PC",
}
# Column order of the paper's Tables 1/2 within a k-shot block: single models, then ensembles.
_TABLE_ORDER: tuple[str, ...] = ("patchcore", "maeday", "2xpatchcore", "maeday+patchcore")

METRIC_TITLES: dict[str, str] = {
    "image_roc_auc": "Table 1. Image-level ROC-AUC",
    "pixel_roc_auc": "Table 2. Pixel-level ROC-AUC",
    "aupro": "AUPRO (FPR ≤ 0.3)",
    "image_f1_max": "Image-level F1-max",
    "pixel_f1_max": "Pixel-level F1-max",
}

MISSING = "–"

Record = dict[str, Any]


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """`payload` as indented JSON, written atomically."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    return write_atomically(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def category_groups(categories: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Row groups of the tables: MVTec AD or the synthetic set → objects, then textures; anything else → one group.

    Categories keep the order of the dataset's own lists (the paper's order for MVTec AD).
    """
    chosen = set(categories)
    for objects, textures in ((MVTEC_OBJECTS, MVTEC_TEXTURES), (SYNTHETIC_OBJECTS, SYNTHETIC_TEXTURES)):
        if chosen <= set(objects) | set(textures):
            groups = [
                ("Objects", [c for c in objects if c in chosen]),
                ("Textures", [c for c in textures if c in chosen]),
            ]
            return [(name, members) for name, members in groups if members]
    return [("Categories", list(categories))]


def is_fod(categories: Sequence[str]) -> bool:
    """The FOD surfaces are reported in Table 3's layout (methods as rows, surfaces as columns)."""
    return bool(categories) and set(categories) <= set(FOD_CONFIGS)


def _seed_values(records: Iterable[Record], metric: str) -> dict[tuple[str, int, str], list[float]]:
    """`(category, shots, method)` → the metric of each shot seed (main study only), seeds in order."""
    values: dict[tuple[str, int, str], list[tuple[int, float]]] = defaultdict(list)
    for record in records:
        value = record["metrics"].get(metric)
        if record["study"] == "main" and value is not None:
            values[(record["category"], record["shots"], record["method"])].append((record["shot_seed"], value))
    return {key: [value for _, value in sorted(pairs)] for key, pairs in values.items()}


def summarize(records: Sequence[Record], metric: str) -> dict[tuple[str, int, str], dict[str, Any]]:
    """`(category, shots, method)` → `{"mean", "std", "values"}` over shot seeds (fractions, not percent)."""
    return {
        key: {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        for key, values in _seed_values(records, metric).items()
    }


def table_columns(records: Sequence[Record]) -> list[tuple[int, str]]:
    """`(shots, method)` columns present in `records`, by shots, then in the paper's method order."""
    present = {(r["shots"], r["method"]) for r in records if r["study"] == "main"}
    order = {method: index for index, method in enumerate(_TABLE_ORDER)}
    return sorted(present, key=lambda column: (column[0], order[column[1]]))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_cell(summary: dict[str, Any] | None) -> str:
    """`"74.3"` for one seed, `"74.8 ± 0.1"` for several, `"–"` when missing (percent, one decimal)."""
    if summary is None:
        return MISSING
    if len(summary["values"]) == 1:
        return _percent(summary["mean"])
    return f"{_percent(summary['mean'])} ± {_percent(summary['std'])}"


def _group_mean(summaries: dict, categories: Sequence[str], column: tuple[int, str]) -> float | None:
    means = [summaries[(c, *column)]["mean"] for c in categories if (c, *column) in summaries]
    return float(np.mean(means)) if len(means) == len(categories) and means else None


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_category_table(records: Sequence[Record], metric: str, categories: Sequence[str]) -> str | None:
    """Tables 1/2 layout: a row per category in object/texture groups with group means and "Mean (All)"; a column per
    (shots, method). `None` when no record has `metric`."""
    summaries = summarize(records, metric)
    if not summaries:
        return None
    columns = table_columns(records)
    header = ["Category"] + [f"{shots}-shot {METHOD_LABELS[method]}" for shots, method in columns]
    groups = category_groups(categories)
    rows: list[list[str]] = []
    for name, members in groups:
        if len(groups) > 1:
            rows.append([f"**{name}**"] + [""] * len(columns))
        rows += [[c] + [format_cell(summaries.get((c, *column))) for column in columns] for c in members]
        if len(groups) > 1:
            means = [_group_mean(summaries, members, column) for column in columns]
            rows.append([f"Mean ({name})"] + [MISSING if m is None else _percent(m) for m in means])
    means = [_group_mean(summaries, list(categories), column) for column in columns]
    rows.append(["Mean (All)"] + [MISSING if m is None else _percent(m) for m in means])
    return _markdown(header, rows)


def render_method_table(records: Sequence[Record], metric: str, categories: Sequence[str]) -> str | None:
    """Table 3 layout (FOD): a row per (method, shots), a column per surface, and their mean."""
    summaries = summarize(records, metric)
    if not summaries:
        return None
    header = ["Method", "Shots", *categories, "Mean"]
    rows = []
    for shots, method in table_columns(records):
        cells = [format_cell(summaries.get((c, shots, method))) for c in categories]
        mean = _group_mean(summaries, categories, (shots, method))
        rows.append([METHOD_LABELS[method], str(shots), *cells, MISSING if mean is None else _percent(mean)])
    return _markdown(header, rows)


def render_tables(records: Sequence[Record], categories: Sequence[str]) -> str:
    """All tables as one Markdown document: image and pixel ROC-AUC first (the paper's), then AUPRO and F1-max."""
    render = render_method_table if is_fod(categories) else render_category_table
    seeds = sorted({record["shot_seed"] for record in records if record.get("shots", 0) > 0})
    covered = f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'}"
    if seeds:
        covered += (f"; k-shot cells: mean ± std over {len(seeds)} shot seed{'s' if len(seeds) > 1 else ''} "
                    f"({', '.join(map(str, seeds))})")
    sections = ["# MAEDAY protocol results", "", f"Percent; {covered}."]
    for metric, title in METRIC_TITLES.items():
        if is_fod(categories) and metric == "image_roc_auc":
            title = "Table 3. Foreign Object Detection, image-level ROC-AUC"
        table = render(records, metric, categories)
        if table is not None:
            sections += ["", f"## {title}", "", table]
    return "\n".join(sections) + "\n"


def require_matplotlib():
    """`matplotlib.figure.Figure`, or an `ImportError` saying how to install the optional dependency."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "matplotlib":  # (not a piece missing inside it)
            raise ImportError(
                'The protocol\'s figures need matplotlib: pip install "maeday-hf[plots]" (or pass --no-plots).'
            ) from error
        # Installed, but it does not import: e.g. a build older than 3.8.4 beside numpy 2.
        raise ImportError(
            f"The protocol's figures need matplotlib, which is installed but fails to import ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}): pip install -U \"maeday-hf[plots]\" "
            f"(or pass --no-plots)."
        ) from error
    return Figure


def _curve_metrics(records: Sequence[Record]) -> list[str]:
    return [m for m in ("image_roc_auc", "pixel_roc_auc") if any(r["metrics"].get(m) is not None for r in records)]


def _save_figure(figure, path: Path) -> Path:
    return write_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=120, bbox_inches="tight"))


def plot_shots(records: Sequence[Record], categories: Sequence[str], path: str | os.PathLike) -> Path | None:
    """Fig. 2: mean ROC-AUC over all categories vs. number of shots, a line per method; error bars are the std over
    shot seeds of the all-category mean. `None` (no file) when there are no main-study records."""
    main = [r for r in records if r["study"] == "main"]
    metrics = _curve_metrics(main)
    if not metrics:
        return None
    figure = require_matplotlib()(figsize=(5 * len(metrics), 4))
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        for method in METHODS:
            points = []
            for shots in sorted({r["shots"] for r in main if r["method"] == method}):
                by_seed: dict[int, list[float]] = defaultdict(list)
                for r in main:
                    if r["method"] == method and r["shots"] == shots and r["metrics"].get(metric) is not None:
                        by_seed[r["shot_seed"]].append(r["metrics"][metric])
                seed_means = [100 * np.mean(v) for v in by_seed.values() if len(v) == len(categories)]
                if seed_means:
                    points.append((shots, np.mean(seed_means), np.std(seed_means)))
            if points:
                x, y, err = zip(*points)
                axes.errorbar(x, y, yerr=err, marker="o", capsize=3, label=METHOD_LABELS[method])
        axes.set_xlabel("shots")
        axes.set_ylabel(f"{metric.split('_')[0]} ROC-AUC (%)")
        axes.set_xticks(sorted({r["shots"] for r in main}))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("ROC-AUC vs. shots (Fig. 2)")
    return _save_figure(figure, Path(path))


def plot_repetitions(records: Sequence[Record], path: str | os.PathLike) -> Path | None:
    """Fig. 3: zero-shot mean ROC-AUC over categories vs. repetitions N (log scale), a line per mask schedule.
    `None` (no file) when there are no repetition-study records."""
    study = [r for r in records if r["study"] == "repetitions"]
    metrics = _curve_metrics(study)
    if not metrics:
        return None
    figure = require_matplotlib()(figsize=(5 * len(metrics), 4))
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        for schedule in sorted({r["mask_schedule"] for r in study}):
            by_n: dict[int, list[float]] = defaultdict(list)
            for r in study:
                if r["mask_schedule"] == schedule and r["metrics"].get(metric) is not None:
                    by_n[r["num_masks"]].append(100 * r["metrics"][metric])
            x = sorted(by_n)
            axes.plot(x, [np.mean(by_n[n]) for n in x], marker="o", label=f"{schedule} masks")
        axes.set_xscale("log", base=2)
        num_masks = sorted({r["num_masks"] for r in study})
        axes.set_xticks(num_masks, [str(n) for n in num_masks])
        axes.set_xlabel("repetitions per image N")
        axes.set_ylabel(f"{metric.split('_')[0]} ROC-AUC (%)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("Zero-shot ROC-AUC vs. repetitions (Fig. 3)")
    return _save_figure(figure, Path(path))
