"""The row every benchmark's `run(quick)` returns, and its validation.

A row compares one figure of pathjax with a reference measured in the same run:
{'benchmark', 'name', 'unit', 'pathjax', 'reference', 'reference_name', 'ratio',
'higher_is_better', 'bound'}. `ratio` is oriented so that > 1 means pathjax is better:
pathjax / reference for rates, reference / pathjax for seconds or bytes. Extra keys are allowed.
"""

import math

FIELDS = {'benchmark': str, 'name': str, 'unit': str, 'pathjax': float, 'reference': float,
          'reference_name': str, 'ratio': float, 'higher_is_better': bool, 'bound': str}
RATIO_TOLERANCE = 0.01  # relative: the ratio must be the oriented quotient of the two figures


def row(name: str, unit: str, pathjax: float, reference: float, reference_name: str,
        higher_is_better: bool, bound: str, **extra) -> dict:
    """A row with its ratio oriented (> 1: pathjax better); `benchmark` is set by the runner."""
    pathjax, reference = float(pathjax), float(reference)
    ratio = pathjax / reference if higher_is_better else reference / pathjax
    return {'name': name, 'unit': unit, 'pathjax': pathjax, 'reference': reference,
            'reference_name': reference_name, 'ratio': ratio,
            'higher_is_better': higher_is_better, 'bound': bound, **extra}


def problems(candidate) -> list[str]:
    """What is wrong with a row (empty when it is valid)."""
    if not isinstance(candidate, dict):
        return [f'a row must be a dict, got {type(candidate).__name__}']
    found = []
    for key, kind in FIELDS.items():
        value = candidate.get(key)
        if value is None:
            found.append(f'no {key!r}')
        elif kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            found.append(f'{key!r} is not a number: {value!r}')
        elif kind is float and not math.isfinite(value):
            found.append(f'{key!r} is not finite: {value!r}')
        elif kind is not float and not isinstance(value, kind):
            found.append(f'{key!r} is not a {kind.__name__}: {value!r}')
    if found:
        return found
    pathjax, reference, ratio = candidate['pathjax'], candidate['reference'], candidate['ratio']
    if ratio <= 0:
        found.append(f'ratio {ratio!r} is not positive')
    elif pathjax > 0 and reference > 0:
        expected = pathjax / reference if candidate['higher_is_better'] else reference / pathjax
        if abs(ratio / expected - 1) > RATIO_TOLERANCE:
            found.append(f'ratio {ratio:.4g} is not the oriented quotient {expected:.4g} '
                         '(> 1 must mean pathjax is better)')
    return found


def print_table(rows: list[dict]) -> None:
    """The rows as a markdown table (a script's own command line)."""
    print('| row | unit | pathjax | reference | ratio | bound |\n|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["name"]} | {r["unit"]} | {r["pathjax"]:.4g} | {r["reference"]:.4g} | '
              f'{r["ratio"]:.2f}x | {r["bound"]} |')
