"""Orbax checkpoints of a training run: the latest few, for resuming, and the best by a metric.

Layout under the run's folder: `latest/<step>/` (the last `keep` checkpoints) and `best/<step>/`
(the one with the best validation metric so far). Each checkpoint holds the train state (restored
into an abstract target, so shapes, dtypes and shardings come from the caller) and a JSON
metadata dict (epoch, metrics). Orbax writes each checkpoint under a temporary name and renames it
when complete, so a killed run never leaves a checkpoint that looks finished.
"""

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
    """Save / restore of one run's checkpoints. Close (or use as a context manager) at the end."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, best_metric: str = '',
                 best_mode: str = 'max'):
        directory = pathlib.Path(directory).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        self._latest = ocp.CheckpointManager(
            directory / 'latest', options=ocp.CheckpointManagerOptions(max_to_keep=keep),
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
        """Saves `state` as the latest checkpoint, and as the best one when
        metadata[best_metric] beats the best so far."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  metadata=ocp.args.JsonSave(metadata))
        self._latest.save(step, args=args)
        if self._best is not None and self._improves(metadata.get(self.best_metric)):
            self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          metadata=ocp.args.JsonSave(metadata)))
            self._best.wait_until_finished()

    def _improves(self, value: float | None) -> bool:
        if value is None:
            return False
        best = self.best_value()
        if best is None:
            return True
        return value > best if self.best_mode == 'max' else value < best

    def restore(self, abstract_state: Any, step: int | None = None, best: bool = False
                ) -> tuple[Any, dict[str, Any]]:
        """(state, metadata) of checkpoint `step` (default: the latest, or the best)."""
        manager = self._best if best else self._latest
        if manager is None:
            raise ValueError('this run keeps no best checkpoint')
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {manager.directory}')
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
        return restored['state'], dict(restored['metadata'])
