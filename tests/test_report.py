"""The report command: figures and summary tables from real runs' results.json.

Two small real runs (fedavg and reft, 2 rounds, 3 devices, tiny data) are made once per module
with the in-process harness. Two more runs are derived from the fedavg run's results.json:
  * "failed": status "failed", error "boom", rounds truncated to 1 of 2 (summary recomputed with the
    writer's own `summarize`, as the writer would have left it);
  * "profl": a FABRICATED ProFL-like run: the strategy is renamed "profl" and every round gets the
    keys the ProFL strategy will write (stage, active_block, effective_movement, frozen, eligible).
    No ProFL strategy ran; this only exercises the report's handling of those keys.
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
from pathlib import Path

import pytest

from benchmarks.run_inprocess import run_inprocess
from fl_app import report as fl_report
from fl_app.report import ReportError, build_report, label_runs, load_run, main
from fl_app.results import load_results, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_FIGURES = {"accuracy_vs_round.png", "accuracy_vs_traffic.png", "accuracy_vs_emulated_time.png",
                "memory_per_client.png", "devices_time.png"}
DPI = 40  # small figures keep the module fast; the default (200) is exercised once by the CLI test


def _write(folder: Path, doc: dict) -> Path:
    """A derived run, written as one results.json with its rounds and devices inside (the format before
    rounds.jsonl, which `load_results` still reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({k: v for k, v in doc.items() if not k.endswith("_file")}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for strategy in ("fedavg", "reft"):
        run_inprocess({"strategy": strategy, "num-server-rounds": 2, "max-client-examples": 32,
                       "test-size": 100, "public-size": 50,
                       "server-distill-epochs": 1, "output-dir": str(root), "run-name": strategy,
                       "device-mix": "raspberry-pi-3b-plus:1,laptop:1,workstation:1"}, 3)
        folders[strategy] = root / strategy
    base = load_results(folders["fedavg"])

    failed = copy.deepcopy(base)
    failed.update(status="failed", error="boom", rounds=failed["rounds"][:1])
    failed["summary"] = summarize(failed["rounds"])
    folders["failed"] = _write(root / "failed", failed)

    profl = copy.deepcopy(base)  # fabricated ProFL-like run, see the module docstring
    profl["config"]["strategy"] = "profl"
    for i, r in enumerate(profl["rounds"]):
        r.update(stage="shrink" if i == 0 else "grow", active_block=i + 1,
                 effective_movement=None if i == 0 else 0.25, frozen=i == 0, eligible=2)
    folders["profl"] = _write(root / "profl", profl)
    return folders


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    order = ["fedavg", "reft", "failed", "profl"]
    return build_report([runs[k] for k in order], out, dpi=DPI), order


def _labels(paths: list[Path]) -> list[str]:
    loaded = [load_run(p) for p in paths]
    label_runs(loaded)
    return [r.label for r in loaded]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_all_figures_and_tables_are_written(report):
    files, _ = report
    names = {p.name for p in files.out.iterdir()}
    assert names == BASE_FIGURES | {"profl.png", "reft.png", "summary.md", "summary.csv"}
    assert {p.name for p in files.figures} == BASE_FIGURES | {"profl.png", "reft.png"}
    for png in files.figures:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, png


def test_summary_csv_equals_numbers_computed_from_results(report, runs):
    files, order = report
    rows = _csv_rows(files.summary_csv)
    assert [r["run"] for r in rows] == order
    for row, name in zip(rows, order):
        doc = load_results(runs[name])
        rounds = doc["rounds"]
        clients = [c for r in rounds for c in r["clients"]]
        peaks = {}
        for c in clients:
            if c["participated"]:
                peaks[c["node_id"]] = max(peaks.get(c["node_id"], 0), c["peak_memory_mb"])
        expected = {
            "rounds_completed": len(rounds),
            "rounds_configured": doc["config"]["num_server_rounds"],
            "final_accuracy": rounds[-1]["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rounds),
            "total_mb_down": sum(r["bytes_down"] for r in rounds) / 1e6,
            "total_mb_up": sum(r["bytes_up"] for r in rounds) / 1e6,
            "emulated_time_s": rounds[-1]["emulated_clock_s"],
            "peak_memory_mb_max": max(peaks.values()),
            "peak_memory_mb_median": statistics.median(peaks.values()),
            "distinct_participants": len({c["node_id"] for c in clients if c["participated"]}),
            "client_failures": sum(1 for c in clients if c["error"]),
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), (name, key)
        assert row["strategy"] == doc["config"]["strategy"] and row["model"] == doc["config"]["model"]


def test_reft_uploads_far_less_than_fedavg(report):
    """Sanity on real numbers: reft sends logits up, so it uploads far less than fedavg."""
    rows = {r["run"]: r for r in _csv_rows(report[0].summary_csv)}
    assert float(rows["reft"]["total_mb_up"]) < float(rows["fedavg"]["total_mb_up"]) / 5
    assert rows["fedavg"]["status"] == rows["reft"]["status"] == "completed"


def test_failed_run_is_kept_and_marked(report, runs):
    files, _ = report
    row = next(r for r in _csv_rows(files.summary_csv) if r["run"] == "failed")
    assert row["status"] == "failed: boom (stopped at round 1/2)"
    assert (row["rounds_completed"], row["rounds_configured"]) == ("1", "2")
    line = next(l for l in files.summary_md.read_text().splitlines() if l.startswith("| failed |"))
    assert "failed: boom" in line and "| 1/2 |" in line
    labels = _labels([runs["fedavg"], runs["failed"]])
    assert labels[1].endswith("(failed)") and "(failed)" not in labels[0]


def test_interrupted_run_is_marked_stopped(runs, tmp_path):
    doc = load_results(runs["fedavg"])
    # A killed process never wrote "completed"; the rounds are cut by hand, so the summary is stale.
    doc.update(status="running", rounds=doc["rounds"][:1])
    folder = _write(tmp_path / "killed", doc)
    files = build_report([folder], tmp_path / "out", dpi=DPI)
    row = _csv_rows(files.summary_csv)[0]
    assert row["status"] == "stopped at round 1/2 (status running)"
    assert (row["rounds_completed"], row["rounds_configured"]) == ("1", "2")
    assert float(row["total_mb_down"]) == doc["rounds"][0]["bytes_down"] / 1e6  # not the stale summary's
    assert "(stopped 1/2)" in _labels([folder])[0]


def test_profl_and_reft_figures_only_for_their_runs(runs, tmp_path):
    files = build_report([runs["fedavg"]], tmp_path / "plain", dpi=DPI)
    names = {p.name for p in files.figures}
    assert names == BASE_FIGURES
    files = build_report([runs["profl"]], tmp_path / "profl", dpi=DPI)
    assert (tmp_path / "profl" / "profl.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (tmp_path / "profl" / "reft.png").exists()


def test_repeated_strategies_get_folder_names_in_labels(runs):
    labels = _labels([runs["fedavg"], runs["fedavg"] / "results.json", runs["reft"]])
    assert labels[0] == "fedavg, cnn, synthetic (fedavg)" and labels[2] == "reft, cnn, synthetic"


def test_cli_default_output_folder_and_dpi(runs, capsys):
    assert main([str(runs["reft"])]) == 0
    out = runs["reft"].parent / "report"
    assert (out / "summary.md").exists() and (out / "reft.png").read_bytes().startswith(PNG_SIGNATURE)
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("case, content, needle", [
    ("missing_folder", None, "no such file"),
    ("missing_file", "", "no such file"),
    ("bad_json", "{not json", "not readable JSON"),
    ("foreign", json.dumps({"name": "something else"}), "not a results file"),
    ("not_object", json.dumps([1, 2]), "not a results file"),
    ("bad_round", json.dumps({"status": "completed", "config": {}, "rounds": [{"round": 1}]}), "rounds[0] lacks"),
])
def test_bad_input_raises_report_error_and_cli_exits_2(tmp_path, capsys, case, content, needle):
    folder = tmp_path / case
    if content is not None:
        folder.mkdir()
        if content:
            (folder / "results.json").write_text(content)
    with pytest.raises(ReportError, match=needle.replace("[", r"\[")):
        build_report([folder], tmp_path / "out")
    assert main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and str(folder) in err and "Traceback" not in err


# ---------------------------------------------------------------- figures a reader can read (issue #14, item 9)


@pytest.fixture
def figures(monkeypatch):
    """Every figure build_report saves, by file name, kept after saving (laid out as written)."""
    import fl_app.report as report_module

    saved = {}
    original = report_module._save

    def keep(fig, path, dpi, files):
        original(fig, path, dpi, files)
        fig.canvas.draw()
        saved[path.name] = fig

    monkeypatch.setattr(report_module, "_save", keep)
    return saved


def _many_clients(runs, tmp_path, n=12) -> Path:
    """The real fedavg run with its devices and clients repeated to `n`, under Flower-sized node ids."""
    doc = load_results(runs["fedavg"])
    devices, ids = [], {}
    for i in range(n):
        d = dict(doc["devices"][i % len(doc["devices"])])
        ids[i] = d["node_id"] = 6_000_000_000_000_000_000 + 7919 * i
        devices.append(d)
    for r in doc["rounds"]:
        base = r["clients"]
        r["clients"] = [dict(base[i % len(base)], node_id=ids[i]) for i in range(n)]
    doc["devices"] = devices
    return _write(tmp_path / "many", doc)


def _overlaps(labels) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent()) for t in labels if t.get_visible() and t.get_text()]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


@pytest.mark.parametrize("n", [5, 12, 30])
def test_client_tick_labels_do_not_overlap(runs, tmp_path, figures, n):
    build_report([_many_clients(runs, tmp_path, n)], tmp_path / "out", dpi=DPI)
    for name in ("memory_per_client.png", "devices_time.png"):
        for ax in figures[name].axes:
            assert not _overlaps(ax.get_xticklabels()), name


def _log_axes(figures):
    for name, fig in figures.items():
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
                if axis.get_scale() == "log":
                    yield name, which, ax, axis


def test_every_log_axis_shows_at_least_two_labelled_ticks(runs, tmp_path, figures):
    build_report([runs["fedavg"], runs["reft"], runs["profl"]], tmp_path / "out", dpi=DPI)
    found = list(_log_axes(figures))
    assert found
    for name, which, ax, axis in found:
        low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
        shown = [t for t in axis.get_ticklabels(which="both")
                 if t.get_text() and low <= (t.get_position()[0] if which == "x" else t.get_position()[1]) <= high]
        assert len(shown) >= 2, (name, which, [t.get_text() for t in shown])


def test_round_axes_have_only_whole_rounds(runs, tmp_path, figures):
    build_report([runs["fedavg"], runs["profl"]], tmp_path / "out", dpi=DPI)
    for name in ("accuracy_vs_round.png", "profl.png"):
        ax = figures[name].axes[0]
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_legends_and_summary_name_model_and_dataset(runs, tmp_path, figures):
    files = build_report([runs["fedavg"], runs["reft"]], tmp_path / "out", dpi=DPI)
    legend = [t.get_text() for t in figures["accuracy_vs_round.png"].axes[0].get_legend().get_texts()]
    assert legend and all("cnn" in t and "synthetic" in t for t in legend), legend
    rows = _csv_rows(files.summary_csv)
    assert [r["dataset"] for r in rows] == ["synthetic", "synthetic"] and rows[0]["model"] == "cnn"
    head = files.summary_md.read_text().splitlines()[2]
    assert "| dataset |" in head


@pytest.mark.parametrize("both, key, value, needle", [({}, "dataset", "mnist", "dataset"),
                                                      ({}, "test_size", 7, "test-size"),
                                                      ({"dataset": "mnist"}, "data_dir", "/elsewhere", "data-dir")])
def test_runs_evaluated_on_different_data_get_one_warning(runs, tmp_path, both, key, value, needle):
    doc = load_results(runs["fedavg"])
    doc["config"].update(both)
    first = _write(tmp_path / "first", doc)
    doc["config"][key] = value
    other = _write(tmp_path / "other", doc)
    warned = fl_report.comparability_warnings([load_run(first), load_run(other)])
    assert len(warned) == 1 and needle in warned[0] and "first" in warned[0] and "other" in warned[0]
    assert fl_report.comparability_warnings([load_run(runs["fedavg"]), load_run(runs["reft"])]) == []


def test_the_warning_reaches_the_summary_and_the_command_line(runs, tmp_path, capsys):
    doc = load_results(runs["fedavg"])
    doc["config"]["dataset"] = "mnist"
    other = _write(tmp_path / "other", doc)
    assert main([str(runs["fedavg"]), str(other), "--out", str(tmp_path / "cli"), "--dpi", str(DPI)]) == 0
    err = capsys.readouterr().err
    assert err.count("report: warning:") == 1 and "dataset" in err and "\n" == err[-1] and err.count("\n") == 1
    assert "**Warning:** the runs were evaluated on different data" in (tmp_path / "cli" / "summary.md").read_text()


def test_effective_movement_axis_only_where_it_was_computed(runs, tmp_path, figures):
    doc = load_results(runs["profl"])
    for r in doc["rounds"]:
        r["effective_movement"] = None
    never = _write(tmp_path / "never", doc)
    build_report([never], tmp_path / "a", dpi=DPI)
    fig = figures["profl.png"]
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_visible()] == ["Active block (1-based)"]
    assert "not computed" in fig.axes[0].get_title()
    build_report([runs["profl"]], tmp_path / "b", dpi=DPI)
    assert "Effective movement" in [ax.get_ylabel() for ax in figures["profl.png"].axes]


def test_reft_panel_shows_devices_that_were_left_out(runs, tmp_path, figures):
    doc = load_results(runs["reft"])
    left = doc["devices"][0]["node_id"]
    for r in doc["rounds"]:
        for c in r["clients"]:
            if c["node_id"] == left:
                c.clear()
                c.update(node_id=left, profile=doc["devices"][0]["profile"], participated=False, error=None,
                         left_out="cannot afford even the smallest submodel")
    folder = _write(tmp_path / "left", doc)
    build_report([folder], tmp_path / "out", dpi=DPI)
    for ax in figures["reft.png"].axes:
        texts = [t.get_text() for t in ax.texts]
        assert sum("left out" in t for t in texts) == 1, texts
        assert "1 of 3 devices left out" in ax.get_title()


def test_device_times_show_the_emulated_deadline_only_when_the_run_had_one(runs, tmp_path, figures):
    doc = load_results(runs["fedavg"])
    doc["config"]["emulated_deadline"] = 2.5
    build_report([_write(tmp_path / "deadline", doc), runs["reft"]], tmp_path / "out", dpi=DPI)
    with_deadline, without = figures["devices_time.png"].axes[:2]
    assert [line.get_ydata()[0] for line in with_deadline.get_lines() if line.get_linestyle() == "--"] == [2.5]
    assert "emulated-deadline 2.5 s" in [t.get_text() for t in with_deadline.get_legend().get_texts()]
    assert not [line for line in without.get_lines() if line.get_linestyle() == "--"]
