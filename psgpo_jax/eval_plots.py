"""Evaluation plots: Best-of-K curves, pass@1 by length and learning curves (matplotlib
Agg canvas, no global pyplot state)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence, Tuple


def _figure(size: Tuple[float, float] = (5.0, 3.6)):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=size, dpi=120)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _save(fig, ax, path: str, title: str, full_range: bool = True) -> str:
  """Title, grid and legend (shares in [0, 1] on the y axis when `full_range`); writes the
  PNG to `path`."""
  if full_range:
    ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


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
