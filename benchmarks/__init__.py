"""pathjax's benchmarks: one script per measured path, each against a reference in the same run.
`python -m benchmarks` runs them all (see __main__.py)."""
