"""A run's per-epoch metrics as JSON lines (`metrics.jsonl` next to its checkpoints), written by
the leader and rewound on resume so that every epoch is logged once."""

import json
import pathlib

from pathjax import artifacts
from pathjax.runtime import sharding


def rewind(path: pathlib.Path, epochs: int) -> None:
    """Drops the lines of epochs after `epochs` (the checkpointed ones: those of an epoch that a
    killed run had begun, which the resumed run logs again) and a line torn by the kill."""
    if sharding.is_leader() and path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines
                if line.endswith('\n') and json.loads(line)['epoch'] <= epochs]
        if len(kept) < len(lines):
            artifacts.save_text(path, ''.join(kept))


def append(path: pathlib.Path, record: dict) -> None:
    """Adds one line ({'epoch': ..., metrics}) on the leader."""
    if sharding.is_leader():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def read(path: pathlib.Path) -> list[dict]:
    """The log's records in order ([] when there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
