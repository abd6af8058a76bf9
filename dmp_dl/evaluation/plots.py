"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Every function takes plain numbers or arrays and draws one figure; the caller embeds the bytes.
The trained model is drawn solid and thick, baselines dashed, each model in the same colour in
every figure.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from dmp_dl.evaluation.diagnostics import cumulative_gains  # noqa: E402

DPI = 100
_STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colours(names: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _line_style(name: str, highlight: str) -> dict:
    return {"linewidth": 2.6, "linestyle": "-", "zorder": 3} if name == highlight else {"linewidth": 1.6, "linestyle": "--"}


def ranking_curves(ranking: Mapping[str, Mapping], ks: Sequence[int], model_name: str) -> bytes:
    """Recall@K and NDCG@K against K, one line per model with a ±1.96 standard-error band.

    ``ranking``: model -> metrics (``recall@K``, ``ndcg@K``, optional ``stderr``).
    """
    colours = _colours(list(ranking))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, title in zip(axes, ("recall", "ndcg"), ("Recall@K", "NDCG@K")):
            for name, m in ranking.items():
                y = np.array([m.get(f"{metric}@{k}", np.nan) for k in ks], dtype=float)
                se = np.array([m.get("stderr", {}).get(f"{metric}@{k}", np.nan) for k in ks], dtype=float)
                ax.plot(ks, y, marker="o", color=colours[name], label=name, **_line_style(name, model_name))
                if np.isfinite(se).all():
                    ax.fill_between(ks, y - 1.96 * se, y + 1.96 * se, color=colours[name], alpha=0.12, linewidth=0)
            ax.set_xscale("log")
            ax.set_xticks(list(ks), [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("K (list length)")
            ax.set_title(title)
            ax.set_ylim(bottom=0)
        axes[0].legend(loc="upper left")
        fig.suptitle("Test split, full ranking (band: ±1.96 standard errors)", fontsize=10, color="#555")
        return _png(fig)


def popularity_bias(ranking: Mapping[str, Mapping], ks: Sequence[int], n_items: int, model_name: str) -> bytes:
    """Average popularity of recommended items (as a multiple of the mean item's) and catalogue
    coverage, against K, one line per model."""
    colours = _colours(list(ranking))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, m in ranking.items():
            style = _line_style(name, model_name)
            pop = np.array([m.get(f"avg_popularity@{k}", np.nan) for k in ks], dtype=float) * n_items
            cov = np.array([m.get(f"coverage@{k}", np.nan) for k in ks], dtype=float)
            axes[0].plot(ks, pop, marker="o", color=colours[name], label=name, **style)
            axes[1].plot(ks, 100 * cov, marker="o", color=colours[name], label=name, **style)
        axes[0].axhline(1.0, color="#888", linewidth=1, linestyle=":", label="mean item")
        axes[0].set_title("Popularity of recommended items (× mean item)")
        axes[0].set_ylim(bottom=0)
        axes[1].set_title("Catalogue coverage of the top-K lists (%)")
        axes[1].set_ylim(0, 100)
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(list(ks), [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("K (list length)")
        axes[0].legend(loc="upper right")
        return _png(fig)


def roc_pr_curves(labels: np.ndarray, predictions: Mapping[str, np.ndarray], model_name: str) -> bytes:
    """ROC and precision-recall curves of each propensity model (labels (n,) 0/1, predictions name -> (n,))."""
    colours = _colours(list(predictions))
    base_rate = float(np.mean(labels))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        for name, p in predictions.items():
            style = _line_style(name, model_name)
            fpr, tpr, _ = roc_curve(labels, p)
            precision, recall, _ = precision_recall_curve(labels, p)
            axes[0].plot(fpr, tpr, color=colours[name], label=name, **style)
            axes[1].plot(recall, precision, color=colours[name], label=name, drawstyle="steps-post", **style)
        axes[0].plot([0, 1], [0, 1], color="#888", linewidth=1, linestyle=":", label="random")
        axes[0].set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC curve", xlim=(0, 1), ylim=(0, 1))
        axes[1].axhline(base_rate, color="#888", linewidth=1, linestyle=":", label=f"base rate {base_rate:.3f}")
        axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall curve", xlim=(0, 1), ylim=(0, 1.02))
        axes[0].legend(loc="lower right")
        axes[1].legend(loc="upper right")
        return _png(fig)


def calibration_and_gains(labels: np.ndarray, predictions: Mapping[str, np.ndarray], model_name: str,
                          n_bins: int = 10) -> bytes:
    """Reliability diagram, cumulative-gains chart and lift chart of each propensity model."""
    colours = _colours(list(predictions))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
        for name, p in predictions.items():
            style = _line_style(name, model_name)
            observed, predicted = calibration_curve(labels, p, n_bins=n_bins, strategy="quantile")
            axes[0].plot(predicted, observed, marker="o", markersize=4, color=colours[name], label=name, **style)
            share, gains = cumulative_gains(labels, p)
            axes[1].plot(100 * share, 100 * gains, color=colours[name], label=name, **style)
            lift_share = share[share >= 0.01]  # the first few users make the lift too noisy to read
            axes[2].plot(100 * lift_share, gains[share >= 0.01] / lift_share, color=colours[name], label=name, **style)
        top = max(axes[0].get_xlim()[1], axes[0].get_ylim()[1], 0.05)
        axes[0].plot([0, top], [0, top], color="#888", linewidth=1, linestyle=":", label="perfectly calibrated")
        axes[0].set(xlabel="mean predicted probability", ylabel="observed positive rate",
                    title=f"Calibration ({n_bins} quantile bins)", xlim=(0, top), ylim=(0, top))
        axes[1].plot([0, 100], [0, 100], color="#888", linewidth=1, linestyle=":", label="random")
        axes[1].set(xlabel="% of users contacted (highest score first)", ylabel="% of positives reached",
                    title="Cumulative gains", xlim=(0, 100), ylim=(0, 100))
        axes[2].axhline(1.0, color="#888", linewidth=1, linestyle=":", label="random")
        axes[2].set(xlabel="% of users contacted (highest score first)", ylabel="lift (× base rate)",
                    title="Lift", xlim=(0, 100), ylim=(0, None))
        for ax, loc in zip(axes, ("upper left", "lower right", "upper right")):
            ax.legend(loc=loc)
        return _png(fig)


def segment_map(sizes: Mapping[int, int], coords: np.ndarray, segments: np.ndarray, explained: Sequence[float]) -> bytes:
    """Segment sizes (bars) and a 2-D projection of user vectors coloured by segment.

    ``coords`` (n, 2) and ``segments`` (n,) are the sampled users' coordinates and segments.
    """
    labels = sorted(sizes)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colour = {s: cmap(i % cmap.N) for i, s in enumerate(labels)}
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.4]})
        positions = np.arange(len(labels))
        axes[0].bar(positions, [sizes[s] for s in labels], color=[colour[s] for s in labels])
        axes[0].set_xticks(positions, [str(s) for s in labels])
        axes[0].set(xlabel="segment", ylabel="users", title="Segment sizes")
        axes[0].grid(axis="x", visible=False)
        for s in labels:
            pts = coords[segments == s]
            axes[1].scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=colour[s], label=str(s), linewidths=0)
        axes[1].set(xlabel=f"PC 1 ({100 * explained[0]:.1f} % of variance)",
                    ylabel=f"PC 2 ({100 * explained[1]:.1f} % of variance)",
                    title=f"User vectors, PCA to 2-D ({len(coords)} users)")
        if len(labels) <= 20:
            axes[1].legend(title="segment", markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
        return _png(fig)


def training_curves(curves: Mapping[str, Sequence]) -> bytes:
    """Mean training loss (left) and validation metrics (right) against the epoch.

    ``curves``: ``epoch`` (n,) and per metric (``train/loss``, ``val/*``) n values, None where the
    epoch did not log it.
    """
    epochs = np.asarray(curves["epoch"], dtype=float)

    def series(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in curves[name]], dtype=float)

    val = sorted(k for k in curves if k.startswith("val/"))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        if "train/loss" in curves:
            y = series("train/loss")
            axes[0].plot(epochs[np.isfinite(y)], y[np.isfinite(y)], marker="o", color="#333", linewidth=2)
        axes[0].set(xlabel="epoch", ylabel="loss", title="Training loss (epoch mean)")
        colours = _colours(val)
        for name in val:
            y = series(name)
            keep = np.isfinite(y)
            axes[1].plot(epochs[keep], y[keep], marker="o", color=colours[name], label=name.removeprefix("val/"),
                         linewidth=2.2 if name.startswith("val/recall") else 1.4,
                         linestyle="-" if name.startswith("val/recall") else "--")
        axes[1].set(xlabel="epoch", title="Validation metrics")
        axes[1].set_ylim(bottom=0)
        if val:
            axes[1].legend(loc="lower right")
        for ax in axes:
            ax.xaxis.get_major_locator().set_params(integer=True)
        return _png(fig)
