"""Matplotlib figures of the evaluation: drawn off-screen, saved atomically, every text drawn as
it is written.

Slide ids, class names and labels are data: a `$` in them must not start mathtext (`a$\\frac$b`
would fail to draw, `price$1 and $2` would be set as math) nor go through TeX, whatever the
user's matplotlibrc says. Only tick labels and axis offsets, which matplotlib's formatters write,
keep its rules.
"""

import os
from typing import Iterator

from matplotlib import artist, axis, figure, text
from matplotlib.backends import backend_agg  # Agg canvas: no display, no pyplot global state

from pathjax import artifacts


def new(**kwargs) -> figure.Figure:
    """A figure on an Agg canvas; `kwargs` go to `Figure` (use layout='tight', not
    `tight_layout()`: laying out measures the texts, which must be made plain first)."""
    fig = figure.Figure(**kwargs)
    backend_agg.FigureCanvasAgg(fig)
    return fig


def written_texts(parent: artist.Artist) -> Iterator[text.Text]:
    """Every Text under `parent` (titles, labels, legend entries, notes) but tick labels and
    axis offsets, which the formatters write."""
    for child in parent.get_children():
        if isinstance(child, axis.Tick) or (isinstance(parent, axis.Axis)
                                            and child is parent.offsetText):
            continue
        if isinstance(child, text.Text):
            yield child
        yield from written_texts(child)


def save(fig: figure.Figure, path: str | os.PathLike, **kwargs) -> None:
    """Writes `fig` as a PNG at `path` (atomically) with its written texts drawn literally (no
    mathtext, no TeX); `kwargs` go to `savefig`."""
    for item in written_texts(fig):
        item.set(parse_math=False, usetex=False)
    with artifacts.atomic_path(path) as temporary:
        fig.savefig(temporary, format='png', **kwargs)
