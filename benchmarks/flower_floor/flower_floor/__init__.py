"""A do-nothing Flower app that times Flower's own per-round cost (scripts/compare_engines.py --floor)."""
