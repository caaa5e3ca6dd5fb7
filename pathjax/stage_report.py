"""Per-stage reports in <workdir>/reports/<stage>.json: one entry per manifest row for the slide
stages, a summary (training, metrics) for the stages that train on the whole cohort."""

import collections
import dataclasses
import os
import pathlib
from typing import Any

from absl import logging

from pathjax import artifacts

OK, NO_TISSUE, ERROR = 'ok', 'no_tissue', 'error'


@dataclasses.dataclass
class SlideEntry:
    """What a stage did with one slide."""

    slide_id: str
    status: str  # OK | NO_TISSUE | ERROR
    patches: int = 0
    message: str = ''
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {'slide_id': self.slide_id, 'status': self.status, 'patches': self.patches,
                'message': self.message, **self.details}


def report_path(workdir: str | os.PathLike, stage: str) -> pathlib.Path:
    return pathlib.Path(workdir) / 'reports' / f'{stage}.json'


def write_summary(workdir: str | os.PathLike, stage: str, summary: dict[str, Any]) -> None:
    """The report of a stage that has no per-slide entries."""
    artifacts.save_json(report_path(workdir, stage), summary)


def write_report(workdir: str | os.PathLike, stage: str, entries: list[SlideEntry]) -> pathlib.Path:
    """Writes the report and logs a summary with every failure named."""
    counts = collections.Counter(e.status for e in entries)
    path = report_path(workdir, stage)
    artifacts.save_json(path, {'stage': stage, 'counts': dict(counts),
                               'slides': [e.as_json() for e in entries]})
    logging.info('%s: %d ok, %d without tissue, %d failed; report: %s', stage, counts[OK],
                 counts[NO_TISSUE], counts[ERROR], path)
    for entry in entries:
        if entry.status == ERROR:
            logging.warning('%s failed for slide %s: %s', stage, entry.slide_id, entry.message)
        elif entry.status == NO_TISSUE:
            logging.warning('%s: slide %s has no tissue patches: %s', stage, entry.slide_id,
                            entry.message)
    return path
