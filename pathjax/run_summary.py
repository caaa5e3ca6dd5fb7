"""The closing lines of a run: each stage's slides ok / skipped (no tissue) / failed and its
time, the test result (AUC with its 95% CI, or the cross-validation's pooled AUC) and the
report's path."""

import contextlib
import dataclasses
import json
import pathlib
import time


@dataclasses.dataclass(frozen=True)
class StageRun:
    name: str
    workdir: pathlib.Path  # a fold's or comparison entry's own, under cross-validation
    seconds: float
    failed: bool


class RunSummary:
    """Collects the stages a run went through (`timed`), then writes the summary (`lines`)."""

    def __init__(self):
        self.stages: list[StageRun] = []

    @contextlib.contextmanager
    def timed(self, name: str, workdir: pathlib.Path):
        start, failed = time.perf_counter(), True
        try:
            yield
            failed = False
        finally:
            self.stages.append(StageRun(name, pathlib.Path(workdir), time.perf_counter() - start,
                                        failed))

    def lines(self, workdir: pathlib.Path) -> list[str]:
        workdir = pathlib.Path(workdir)
        out = ['Summary:']
        for stage in self.stages:
            where = stage.workdir.relative_to(workdir) if stage.workdir != workdir else ''
            label = f'{stage.name} ({where})' if where else stage.name
            out.append(f'  {label:<28} {outcome(stage):<36} {stage.seconds:7.1f} s')
        out += [f'  {line}' for line in results(workdir)]
        page = workdir / 'report.html'
        if page.exists():
            out.append(f'  report: {page.resolve()}')
        return out


def outcome(stage: StageRun) -> str:
    """'8 ok, 1 skipped, 0 failed' from the stage's report, 'done' or 'failed' without one."""
    report = stage.workdir / 'reports' / f'{stage.name}.json'
    counts = {}
    if report.exists():
        counts = json.loads(report.read_text()).get('counts') or {}
    if not counts:
        return 'failed' if stage.failed else 'done'
    text = (f'{counts.get("ok", 0)} ok, {counts.get("no_tissue", 0)} skipped, '
            f'{counts.get("error", 0)} failed')
    return text + (' (stopped)' if stage.failed else '')


def auc_text(metrics: dict) -> str:
    """'AUC 0.912 (95% CI 0.800-1.000) on 16 slides' (n/a with one class)."""
    auc, interval = metrics.get('auc'), metrics.get('auc_ci95')
    text = 'AUC n/a (one class)' if auc is None else f'AUC {auc:.3f}'
    if auc is not None and interval and None not in interval:
        text += f' (95% CI {interval[0]:.3f}-{interval[1]:.3f})'
    return f'{text} on {metrics.get("num_slides")} slides'


def results(workdir: pathlib.Path) -> list[str]:
    """The run's headline results, from what it wrote."""
    lines = []
    cv = workdir / 'cv' / 'summary.json'
    if cv.exists():
        summary = json.loads(cv.read_text())
        lines.append(f'cross-validation: pooled out-of-fold {auc_text(summary)}')
    for metrics_file in sorted(workdir.glob('eval/*/metrics.json')):
        metrics = json.loads(metrics_file.read_text())
        lines.append(f'{metrics["split"]} {auc_text(metrics)}')
    predictions = workdir / 'predict' / 'predictions.csv'
    if predictions.exists():
        count = len(predictions.read_text().splitlines()) - 1
        lines.append(f'predictions for {count} new slides: {predictions}')
    return lines
