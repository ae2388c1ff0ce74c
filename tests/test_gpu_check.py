"""benchmarks/gpu_check.py at its CPU-sized settings: every part runs and writes into the one folder, so
the script is ready whenever a GPU is lent."""

import pytest

from benchmarks.gpu_check import main


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_cpu_at_tiny_settings(tmp_path):
    assert main(["--tiny", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert all(f"{part}: exit 0" in summary for part in ("(a) tests", "(b) memory", "(c) profl_paper"))
    memory = (tmp_path / "profl_memory.txt").read_text()
    assert "full-model training" in memory and "grow train 1" in memory and "predicted" in memory
    table = (tmp_path / "profl_paper" / "table.md").read_text()
    assert "| profl | 1/1 |" in table and "| allsmall | 1/1 |" in table
    assert "passed" in (tmp_path / "tests.txt").read_text()
