"""The test suite as a package, so `tests.conftest` is ours: a dependency (torchstain) installs a
top-level `tests` package of its own into site-packages."""
