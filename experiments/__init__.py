"""Experiments: grids of runs (strategies x seeds x run-config values) through the ServerApp's own
round loop, in-process, several at once; resumable; reported as mean ± std over seeds.
`python -m experiments SPEC.toml` (see experiments/__main__.py and experiments/spec.py)."""
