"""The TensorBoard heatmaps whose rows or columns are indices (``moe/expert_load``'s experts, ``dges/A_layer<l>``'s
experts): the visible tick labels must name whole cells, not '0.5' or '-0.5' (matplotlib's own ticks for an
axis of 2 cells), which read as an expert or a layer that does not exist."""
from __future__ import annotations

import numpy as np
import pytest


def _visible(ax, axis: str) -> list[tuple[str, float]]:
    ticks, labels, limits = ((ax.get_xticks(), ax.get_xticklabels(), ax.get_xlim()) if axis == "x"
                             else (ax.get_yticks(), ax.get_yticklabels(), ax.get_ylim()))
    return [(t.get_text(), p) for t, p in zip(labels, ticks) if min(limits) <= p <= max(limits)]


@pytest.mark.parametrize("rows, cols", [(2, 2), (1, 3), (3, 4), (2, 16)])
def test_index_axes_are_labelled_by_whole_cells(rows, cols):
    import matplotlib.pyplot as plt

    from desmoe.monitor import heatmap_figure

    fig = heatmap_figure(5, "moe/expert_load", np.full((rows, cols), 1.0 / cols), xlabel="expert (global id)",
                         ylabel="domain", yticks=None, vmin=0.0, vmax=1.0)
    fig.canvas.draw()
    ax = fig.axes[0]
    for axis, n in (("x", cols), ("y", rows)):
        shown = _visible(ax, axis)
        assert shown, (axis, shown)
        for text, position in shown:
            assert position == int(position) and 0 <= position < n, (axis, shown)
            assert text.replace("\u2212", "-") == str(int(position)), (axis, shown)
    plt.close(fig)


def test_named_axes_keep_their_names():
    from desmoe.monitor import heatmap_figure

    fig = heatmap_figure(1, "accuracy_matrix", np.full((2, 2), 50.0), xticks=["aircraft", "dtd"], yticks=["a", "b"])
    fig.canvas.draw()
    assert [t for t, _ in _visible(fig.axes[0], "x")] == ["aircraft", "dtd"]
    assert [t for t, _ in _visible(fig.axes[0], "y")] == ["a", "b"]
