"""What people look at after a run: heatmap overlays, ROC/PR curves, score histograms, a report page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pdd.config import atomic_write_text
from pdd.data.readers import read_image
from pdd.metrics import IMAGE_METRICS

if TYPE_CHECKING:
    from pdd.evaluate import Predictions

__all__ = ["heatmap_overlay", "metrics_table", "write_report"]


def _display_image(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = read_image(path)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize(size[::-1], Image.BILINEAR)
    return np.asarray(pil).astype(np.float32) / 255


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1] with the anomaly map (H, W) in the 'jet' colours laid over it."""
    from matplotlib import colormaps

    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = colormaps["jet"](norm)[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0.0, 1.0)


def _save_fig(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def _overlays(out: Path, p: Predictions, k: int) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-p.scores, kind="stable")
    vmin, vmax = float(np.percentile(p.maps, 1)), float(np.percentile(p.maps, 99.9))
    figures = []
    for title, idx in (("most anomalous", order[:k]), ("least anomalous", order[::-1][:k])):
        fig, axes = plt.subplots(1, len(idx), figsize=(3 * len(idx), 3.4), squeeze=False)
        for ax, i in zip(axes[0], idx):
            img = _display_image(p.paths[i], p.maps.shape[1:])
            ax.imshow(heatmap_overlay(img, p.maps[i], vmin, vmax))
            if p.has_mask[i] and p.masks[i].any():
                ax.contour(p.masks[i], levels=[0.5], colors="white", linewidths=1)
            ax.set_title(f"{Path(p.paths[i]).parent.name}/{Path(p.paths[i]).name}\n"
                         f"score {p.scores[i]:.3f} ({'anomalous' if p.labels[i] else 'normal'})", fontsize=7)
            ax.axis("off")
        name = "overlays_" + title.replace(" ", "_") + ".png"
        _save_fig(fig, out / name)
        plt.close(fig)
        figures.append((title, name))
    return figures


def _curves(out: Path, p: Predictions) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(p.labels, p.scores)
    prec, rec, _ = precision_recall_curve(p.labels, p.scores)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(fpr, tpr)
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set(title="image ROC", xlabel="false positive rate", ylabel="true positive rate")
    axes[1].plot(rec, prec)
    axes[1].set(title="image precision-recall", xlabel="recall", ylabel="precision")
    bins = np.linspace(p.scores.min(), p.scores.max(), 30)
    axes[2].hist(p.scores[p.labels == 0], bins=bins, alpha=0.6, label="normal")
    axes[2].hist(p.scores[p.labels == 1], bins=bins, alpha=0.6, label="anomalous")
    axes[2].set(title="image scores", xlabel="score", ylabel="images")
    axes[2].legend()
    _save_fig(fig, out / "curves.png")
    plt.close(fig)
    return [("ROC, precision-recall and score histogram", "curves.png")]


def _operating_points(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(level, how its threshold was chosen, counts on the evaluated set) for each calibrated level."""
    op = metrics.get("operating_point", {})
    return [(f"{level} threshold {op[level]['threshold']:.6g}", op[level]["chosen"], op[level]["summary"])
            for level in ("image", "pixel") if level in op]


def write_report(out: Path, p: Predictions, metrics: dict[str, Any], title: str = "PDD evaluation",
                 k: int = 6, skipped: list[tuple[str, str]] | None = None) -> Path:
    """Write ``report.md`` and ``report.html`` (with the PNG figures) into ``out``; returns the HTML path."""
    figures = _curves(out, p) + _overlays(out, p, min(k, len(p.scores)))
    info = metrics["images"]
    summary = (f"{info['total']} test images ({info['anomalous']} anomalous, {info['with_mask']} with masks), "
               f"scored in {info['seconds']:.1f} s; {info['skipped_unreadable']} unreadable file(s) skipped.")
    run = metrics.get("run", {})
    md = [f"# {title}", "", summary, ""]
    md += [f"- {k}: {v}" for k, v in run.items()]
    md += ["", "Metrics (%):", "", metrics_table(metrics), ""]
    if "note" in metrics:
        md += [f"Note: {metrics['note']}", ""]
    points = _operating_points(metrics)
    if points:
        md += ["## Operating point", ""] + [f"- {level}: {chosen}. On this set: {counts}."
                                            for level, chosen, counts in points] + [""]
    for caption, name in figures:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    if skipped:
        md += ["## Skipped files", ""] + [f"- {path}: {reason}" for path, reason in skipped] + [""]
    atomic_write_text(out / "report.md", "\n".join(md))

    table = metrics_table(metrics).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    body = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:]]
    rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>",
        "<ul>" + "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in run.items()) + "</ul>",
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + rows_html + "</table>",
    ]
    if "note" in metrics:
        parts.append(f"<p>Note: {html.escape(metrics['note'])}</p>")
    if points:
        parts.append("<h2>Operating point</h2><ul>" + "".join(
            f"<li>{html.escape(level)}: {html.escape(chosen)}. On this set: {html.escape(counts)}.</li>"
            for level, chosen, counts in points) + "</ul>")
    for caption, name in figures:
        parts.append(f"<h2>{html.escape(caption)}</h2><img src='{html.escape(name)}' alt='{html.escape(caption)}'>")
    if skipped:
        parts.append("<h2>Skipped files</h2><ul>" + "".join(
            f"<li>{html.escape(a)}: {html.escape(b)}</li>" for a, b in skipped) + "</ul>")
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per class plus the mean over classes and the pooled metrics, percentages."""
    mean = metrics["mean"]
    keys = [k for k in (*IMAGE_METRICS, "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mAD") if k in mean]
    lines = ["| class | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    rows = list(metrics["per_class"].items())
    if len(rows) > 1:
        rows.append(("mean", mean))
        if "pooled" in metrics:
            rows.append(("pooled", metrics["pooled"]))
    for name, vals in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * vals[k]:.1f}" if k in vals else "–" for k in keys) + " |")
    return "\n".join(lines)
