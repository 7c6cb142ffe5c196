"""Evaluation plots: Best-of-K curves and pass@1 by length (matplotlib Agg canvas, no
global pyplot state)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence, Tuple


def _figure(size: Tuple[float, float] = (5.0, 3.6)):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=size, dpi=120)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _save(fig, ax, path: str, title: str) -> str:
  """Shares in [0, 1] on the y axis, title, grid and legend; writes the PNG to `path`."""
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
