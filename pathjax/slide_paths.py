"""Per-slide file names: the one place a slide id becomes a path.

A manifest's slide ids name files in the workdir (`tiles/<id>.npz`, `qc/<id>.png`, ...), so an
id must be a safe file name everywhere: 1 to 128 characters from `A-Z a-z 0-9 . _ -`, starting
with a letter, a digit or `_` (no leading dot: `.`, `..` and hidden files; no leading `-`: an
option to command-line tools). Two ids that differ only in case name one file on a
case-insensitive file system (macOS, Windows), so a manifest may not hold both.
`slide_file` builds every per-slide path, and refuses an id outside the rule (one read back from
a file, say) or a path that would leave its folder.
"""

import os
import pathlib
import re

MAX_LENGTH = 128
_SAFE_ID = re.compile(r'[A-Za-z0-9_][A-Za-z0-9._-]*')
RULE = (f'1 to {MAX_LENGTH} characters from A-Z a-z 0-9 . _ -, starting with a letter, a digit '
        'or _')


class SlideIdError(ValueError):
    """A slide id that is not a safe file name."""


def id_problem(slide_id: str) -> str | None:
    """Why `slide_id` cannot name a file (None when it can)."""
    if not slide_id:
        return 'the slide id is empty'
    if len(slide_id) > MAX_LENGTH:
        return f'the slide id has {len(slide_id)} characters (at most {MAX_LENGTH})'
    if not _SAFE_ID.fullmatch(slide_id):
        return f'slide id {slide_id!r} is not a safe file name ({RULE})'
    return None


def collision_key(slide_id: str) -> str:
    """The name two ids share when a case-insensitive file system would make them one file."""
    return slide_id.lower()


def slide_file(workdir: str | os.PathLike, folder: str, slide_id: str,
               suffix: str = '') -> pathlib.Path:
    """`<workdir>/<folder>/<slide_id><suffix>`, e.g. slide_file(w, 'tiles', id, '.npz').

    Folders inside the workdir may be links that pathjax made (cross-validation's folds share
    one scan folder), so the check is on the path as written: it must stay in `folder`.

    Raises:
        SlideIdError: the id breaks the rule, or the path would leave `<workdir>/<folder>`.
    """
    problem = id_problem(slide_id)
    if problem:
        raise SlideIdError(problem)
    parent = os.path.normpath(os.path.join(os.fspath(workdir), folder))
    path = os.path.normpath(os.path.join(parent, slide_id + suffix))
    if os.path.dirname(path) != parent:
        raise SlideIdError(f'{slide_id + suffix!r} would leave {parent}')
    return pathlib.Path(path)
