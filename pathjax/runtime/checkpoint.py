"""Orbax checkpoints of a training run: the latest few, for resuming, and the best by a metric.

Layout under the run's folder: `latest/<step>/` (the last KEEP_LATEST checkpoints) and
`best/<step>/` (the one with the highest validation metric so far). Each checkpoint holds the train state (restored
into an abstract target, so shapes, dtypes and shardings come from the caller) and a JSON
metadata dict (epoch, metrics). Orbax writes each checkpoint under a temporary name and renames it
when complete, so a killed run never leaves a checkpoint that looks finished.
"""

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

KEEP_LATEST = 2  # latest checkpoints kept for resuming


class Checkpoints:
    """Save / restore of one run's checkpoints. Close (or use as a context manager) at the end."""

    def __init__(self, directory: str | os.PathLike, best_metric: str = ''):
        directory = pathlib.Path(directory).absolute()
        self.directory, self.best_metric = directory, best_metric
        self._latest = ocp.CheckpointManager(
            directory / 'latest', options=ocp.CheckpointManagerOptions(max_to_keep=KEEP_LATEST),
            item_names=('state', 'metadata'))
        self._best = None
        if best_metric:
            self._best = ocp.CheckpointManager(
                directory / 'best', options=ocp.CheckpointManagerOptions(max_to_keep=1),
                item_names=('state', 'metadata'))

    def __enter__(self) -> 'Checkpoints':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for manager in (self._latest, self._best):
            if manager is not None:
                manager.wait_until_finished()
                manager.close()

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return None if self._best is None else self._best.latest_step()

    def best_value(self) -> float | None:
        """The best metric value saved so far (None before the first best checkpoint)."""
        step = self.best_step()
        if step is None:
            return None
        return self._best.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore()))['metadata'][self.best_metric]

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Saves `state` as the best checkpoint when metadata[best_metric] is higher than the
        best so far, then as the latest. In that order: a run killed between the two writes
        resumes from the previous latest and redoes this step, so a new best is never lost (in
        the other order the resumed run would go on from this step without its best)."""
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  metadata=ocp.args.JsonSave(metadata))
        value = metadata.get(self.best_metric)
        if self._best is not None and value is not None:
            best = self.best_value()
            if best is None or value > best:
                self._best.save(step, args=args)
                self._best.wait_until_finished()
        self._latest.save(step, args=args)

    def restore_params(self, abstract_params: Any, which: str) -> tuple[Any, dict[str, Any]]:
        """(params, metadata with 'checkpoint': 'best' or 'latest') of the checkpoint `which`
        names; 'best' falls back to the latest when no checkpoint had a validation score. Reads
        the state's parameters alone (into `abstract_params`), not the optimizer state: what
        extraction and prediction use, without knowing the optimizer."""
        best = which == 'best' and self.best_step() is not None
        if which == 'best' and not best:
            logging.warning('%s: no best checkpoint (no validation score); using the latest',
                            self.directory)
        manager, step = self._newest(best)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=_tree_restore({'params': abstract_params}, partial=True),
            metadata=ocp.args.JsonRestore()))
        return restored['state']['params'], {'checkpoint': 'best' if best else 'latest',
                                             **restored['metadata']}

    def restore(self, abstract_state: Any, best: bool = False) -> tuple[Any, dict[str, Any]]:
        """(state, metadata) of the latest (or the best) checkpoint."""
        manager, step = self._newest(best)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=_tree_restore(abstract_state), metadata=ocp.args.JsonRestore()))
        return restored['state'], dict(restored['metadata'])

    def _newest(self, best: bool) -> tuple[ocp.CheckpointManager, int]:
        """The manager of the best (or latest) checkpoints and its newest step."""
        manager = self._best if best else self._latest
        if manager is None:
            raise ValueError('this run keeps no best checkpoint')
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {manager.directory}')
        return manager, step


def _tree_restore(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restores into `target` (its shapes, dtypes and shardings); with `partial`, the subtree of
    the saved tree that target names (the rest is not read)."""
    return ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial)
