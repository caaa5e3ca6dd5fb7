"""The settings a workdir's artifacts were made with, so a rerun cannot silently mix them.

Finished work is skipped on rerun, so a rerun with, say, another `tile.mpp` would leave the old
tiles in place and build on them. Each stage therefore records the config fields its artifacts
depend on (its own and those of the stages before it) in `<workdir>/settings/<stage>.json`; a
later run of the stage with other values stops before any work and names the fields that
differ. Fields that only say how long to train (`learn.epochs`, `train.max_steps`, ...) are not
recorded: extending a finished training is a resume.
"""

import json
import pathlib
from typing import Any

from pathjax import artifacts
from pathjax.errors import UsageError


def _value(config, dotted: str) -> Any:
    value = config
    for part in dotted.split('.'):
        value = value[part]
    if hasattr(value, 'to_dict'):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(f'{prefix}.{key}', item))
        return flat
    return {prefix: list(value) if isinstance(value, tuple) else value}  # as JSON reads it back


def settings_of(config, fields: list[str]) -> dict[str, Any]:
    """{dotted field: value} of the given fields or sections, flattened."""
    flat = {}
    for field in fields:
        flat.update(_flatten(field, _value(config, field)))
    return flat


def check_matches(workdir, stage: str, settings: dict[str, Any], artifacts_hint: str) -> None:
    """Raises UsageError if the stage ran in this workdir with other settings (nothing when it has
    not run)."""
    path = pathlib.Path(workdir) / 'settings' / f'{stage}.json'
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    changed = sorted(k for k in recorded.keys() | settings.keys()
                     if recorded.get(k) != settings.get(k))
    if changed:
        details = ', '.join(f'{k} was {recorded.get(k)!r}, now {settings.get(k)!r}'
                            for k in changed)
        raise UsageError(f'{stage}: this workdir was made with other settings ({details}); '
                         f'use a new --workdir, or delete {artifacts_hint} (and what later '
                         f'stages made from it) to redo it')


def changed_slides(workdir, stage: str, digests: dict[str, str]) -> list[str]:
    """The slides whose digest (`tile_stage.tiles_digest`) differs from the one recorded when the
    stage last started in this workdir; then records `digests`. A slide without tiles now ('')
    is not a change: its absence is the tile report's, and finished work is kept."""
    path = pathlib.Path(workdir) / 'settings' / f'{stage}.slides.json'
    recorded = json.loads(path.read_text()) if path.exists() else {}
    changed = sorted(s for s, digest in digests.items()
                     if digest and s in recorded and recorded[s] != digest)
    kept = {s: digest or recorded.get(s, '') for s, digest in digests.items()}
    artifacts.save_text(path, json.dumps(kept, indent=1, sort_keys=True) + '\n')
    return changed


def check_and_record(workdir, stage: str, settings: dict[str, Any], artifacts_hint: str) -> None:
    """Raises UsageError if the stage ran in this workdir with other settings; else records them."""
    check_matches(workdir, stage, settings, artifacts_hint)
    path = pathlib.Path(workdir) / 'settings' / f'{stage}.json'
    artifacts.save_text(path, json.dumps(settings, indent=1, sort_keys=True) + '\n')
