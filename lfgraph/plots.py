"""Moved to :mod:`lfgraph.visualize.plots`; kept so ``from lfgraph.plots import plot_analysis`` works."""

from .visualize.plots import MAX_GROUPS, plot_analysis

__all__ = ["MAX_GROUPS", "plot_analysis"]
