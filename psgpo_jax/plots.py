"""Every plot a run or a report writes, in one style: Best-of-K curves, pass@1 by length,
learning curves, training monitors (panels over steps) and the PRM's reliability diagram.

Each function takes plain numbers and a path and writes one PNG on a matplotlib Agg canvas
(no global pyplot state, safe in any thread or backend).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

# RL metrics plotted over training steps (a run's training.png, the ablation's monitors):
# the pass rate, the reward-hacking monitors, KL and held-out pass@1.
TRAINING_PLOT_KEYS = (
    ("reward/pass_rate", "train pass rate"), ("reward/prm_score_mean", "mean PRM score"),
    ("reward/kl", "KL to reference"), ("reward/lines_per_response", "lines / response"),
    ("reward/trivial_line_share", "trivial line share"),
    ("eval/greedy_pass@1", "held-out greedy pass@1"), ("eval/pass@1", "held-out pass@1"))


def _canvas(size: Tuple[float, float], rows: int = 1, columns: int = 1, dpi: int = 120):
  """A figure on an Agg canvas and its [rows * columns] axes (a list)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=size, dpi=dpi)
  FigureCanvasAgg(fig)
  return fig, [fig.add_subplot(rows, columns, i + 1) for i in range(rows * columns)]


def _figure(size: Tuple[float, float] = (5.0, 3.6)):
  fig, (ax,) = _canvas(size)
  return fig, ax


def _write(fig, path: str) -> str:
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


def _save(fig, ax, path: str, title: str, full_range: bool = True) -> str:
  """Title, grid and legend (shares in [0, 1] on the y axis when `full_range`); writes the
  PNG to `path`."""
  if full_range:
    ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return _write(fig, path)


def plot_best_of_k(curves: Mapping[str, Mapping[int, float]], path: str,
                   title: str = "Best-of-K") -> str:
  """Best-of-K curves, one line per label (e.g. "oracle", "PRM", "no PRM"); log2 K axis."""
  fig, ax = _figure()
  for label, curve in curves.items():
    ks = sorted(curve)
    ax.plot(ks, [curve[k] for k in ks], marker="o", label=label)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("K (samples per problem)")
  ax.set_ylabel("share of problems solved")
  return _save(fig, ax, path, title)


def plot_pass_by_length(rows_by_label: Mapping[str, Sequence[Mapping[str, float]]], path: str,
                        xlabel: str = "response lines",
                        title: str = "pass@1 by response length") -> str:
  """pass@1 per length bucket (rows from `pass_rate_by_bucket`), one line per label."""
  fig, ax = _figure()
  for label, rows in rows_by_label.items():
    x = [r["lo"] if r["hi"] - r["lo"] == 1 else (r["lo"] + r["hi"]) / 2 for r in rows]
    ax.errorbar(x, [r["pass@1"] for r in rows], yerr=[r["stderr"] for r in rows],
                marker="o", capsize=2, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("pass@1")
  return _save(fig, ax, path, title)


def plot_learning_curves(curves: Mapping[str, Mapping[int, Tuple[float, float]]], path: str,
                         title: str = "held-out pass@1 during RL") -> str:
  """Held-out pass@1 against RL updates, one line per label with a ±1 standard-error band.

  Args:
    curves: {label: {updates: (mean, stderr)}}, e.g. a setting's mean over seeds.
    path: where the PNG goes.
    title: the plot's title.
  """
  fig, ax = _figure((6.4, 4.2))
  for label, curve in curves.items():
    steps = sorted(curve)
    mean = [curve[s][0] for s in steps]
    lo = [curve[s][0] - curve[s][1] for s in steps]
    hi = [curve[s][0] + curve[s][1] for s in steps]
    line, = ax.plot(steps, mean, marker=".", label=label)
    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
  ax.set_xlabel("RL updates")
  ax.set_ylabel("pass@1")
  return _save(fig, ax, path, title, full_range=False)


def plot_panels(series: Mapping[str, Mapping[str, Sequence[Tuple[float, float]]]],
                panels: Sequence[Tuple[str, str, str]], path: str, columns: int = 4) -> str:
  """Small multiples: one panel per (key, title, x label) of `panels`, and in each one
  line per label of `series` ({label: {key: [(x, y), ...]}}); a legend when there are
  several labels. A label keeps its colour in every panel; keys without points leave
  their panel empty."""
  rows = -(-len(panels) // columns)
  fig, axes = _canvas((3.5 * columns, 3.0 * rows), rows, columns, dpi=100)
  for ax, (key, title, xlabel) in zip(axes, panels):
    for i, (label, by_key) in enumerate(series.items()):
      points = sorted(by_key.get(key, ()))
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label,
                color=f"C{i % 10}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  for ax in axes[len(panels):]:
    ax.axis("off")
  if len(series) > 1:
    axes[0].legend(fontsize=7)
  return _write(fig, path)


def training_series(rows: Sequence[Mapping[str, Any]]) -> Dict[str, List[Tuple[float, float]]]:
  """{key: [(x, value)]} of `TRAINING_PLOT_KEYS` from RL metrics rows; held-out
  evaluations are placed by the number of updates before them (0 = initial policy)."""
  out: Dict[str, List[Tuple[float, float]]] = {}
  for key, _ in TRAINING_PLOT_KEYS:
    x_key = "eval/updates" if key.startswith("eval/") else "step"
    out[key] = [(float(r[x_key]), float(r[key])) for r in rows
                if isinstance(r.get(key), (int, float)) and x_key in r]
  return out


def training_panels() -> List[Tuple[str, str, str]]:
  """(key, title, x label) of each training plot panel."""
  return [(key, title, "PPO updates" if key.startswith("eval/") else "step")
          for key, title in TRAINING_PLOT_KEYS]


def plot_training(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  """A run's training.png: pass rate, KL, the reward-hacking monitors and held-out pass@1
  over its RL metrics rows."""
  return plot_panels({"run": training_series(rows)}, training_panels(), path)


def plot_calibration(bins: Sequence[Mapping[str, Any]], path: str, title: str = "PRM") -> str:
  """A reliability diagram: mean predicted probability against the share of +1 lines per
  bin (bins of `prm.metrics.calibration`), each point annotated with its count."""
  fig, ax = _figure((4.0, 4.0))
  used = [b for b in bins if b["count"]]
  ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="ideal")
  ax.plot([b["mean_prob"] for b in used], [b["positive_rate"] for b in used], "o-",
          label="PRM")
  for b in used:
    ax.annotate(str(b["count"]), (b["mean_prob"], b["positive_rate"]), fontsize=6,
                textcoords="offset points", xytext=(3, -8))
  ax.set_xlabel("predicted P(line recoverable) = (score + 1) / 2")
  ax.set_ylabel("share of +1 labels")
  ax.set_xlim(0, 1)
  return _save(fig, ax, path, title)
