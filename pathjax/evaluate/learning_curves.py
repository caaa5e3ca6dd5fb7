"""Learning curves of both training stages, drawn from their per-epoch metrics logs.

Left: the feature network (`feature_net/metrics.jsonl`): training loss per epoch and the
validation patch accuracy. Right: the slide model (`slide_net/metrics.jsonl`): training and
validation loss per epoch and the validation AUC. A stage without a log is drawn as a note.
"""

import pathlib

from pathjax.evaluate import figures
from pathjax.runtime import metrics_log

# (log file under the workdir, title, losses plotted, score plotted on the right axis)
PANELS = (
    ('feature_net/metrics.jsonl', 'feature network (AM-softmax)', ('train_loss',),
     'val_accuracy'),
    ('slide_net/metrics.jsonl', 'slide model', ('train_loss', 'val_loss'), 'val_auc'),
)


def epoch_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that hold `key` with a value (epoch summaries; a
    feature-learning log also holds per-step lines, which have no epoch-level keys)."""
    chosen = [(r['epoch'], r[key]) for r in records if r.get(key) is not None]
    return [e for e, _ in chosen], [v for _, v in chosen]


def plot_learning_curves(workdir, path: pathlib.Path) -> None:
    """Writes the two panels as one PNG at `path`."""
    fig = figures.new(figsize=(10, 3.8), dpi=110, layout='tight')
    for index, (log, title, losses, score) in enumerate(PANELS):
        axes = fig.add_subplot(1, 2, index + 1)
        records = metrics_log.read(pathlib.Path(workdir) / log)
        axes.set_title(title, fontsize=10)
        if not any(epoch_series(records, key)[0] for key in (*losses, score)):
            axes.text(0.5, 0.5, f'no epochs logged\n({log})', ha='center', va='center',
                      transform=axes.transAxes)
            axes.set_axis_off()
            continue
        for key in losses:
            axes.plot(*epoch_series(records, key), marker='o', markersize=3,
                      label=key.replace('_', ' '))
        axes.set(xlabel='epoch', ylabel='loss')
        right = axes.twinx()
        epochs, values = epoch_series(records, score)
        right.plot(epochs, values, color='tab:green', marker='s', markersize=3,
                   label=score.replace('_', ' '))
        right.set(ylabel=score.replace('_', ' '), ylim=(0, 1.02))
        lines = axes.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        axes.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc='best')
    figures.save(fig, path)
