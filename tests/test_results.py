"""Results on disk: a small results.json, rounds and devices appended as JSON Lines, nothing lost in a crash."""

import json

import pytest

from fl_app.results import ResultsError, ResultsWriter, load_results


def a_round(n: int, clients: int = 3) -> dict:
    return {"round": n, "accuracy": 0.1 * n, "loss": 2.0, "bytes_down": 10, "bytes_up": 5, "seconds": 1.0,
            "participants": clients, "emulated_clock_s": 3.0 * n,
            "clients": [{"node_id": i, "profile": "laptop", "participated": True, "error": None,
                         "device_time_s": 3.0} for i in range(clients)]}


def devices(n: int) -> list[dict]:
    return [{"node_id": i, "partition_id": i, "profile": "laptop", "gflops": 1.0, "memory_mb": 1.0}
            for i in range(n)]


def test_rounds_are_appended_and_results_json_stays_small(tmp_path):
    writer = ResultsWriter(tmp_path, {"seed": 0}, devices(1000))
    sizes = []
    for n in range(1, 31):
        writer.add_round(a_round(n, clients=100))
        sizes.append((tmp_path / "results.json").stat().st_size)
    small = json.loads((tmp_path / "results.json").read_text())
    assert "rounds" not in small and "devices" not in small
    assert max(sizes) < 2000 and max(sizes) - min(sizes) < 100  # independent of rounds and nodes
    assert (tmp_path / "rounds.jsonl").read_text().count("\n") == 30
    assert (tmp_path / "devices.jsonl").read_text().count("\n") == 1000


def test_load_results_returns_the_whole_run(tmp_path):
    writer = ResultsWriter(tmp_path, {"seed": 0}, devices(3))
    writer.add_round(a_round(1))
    writer.set_devices(devices(4))  # a node joined
    writer.add_round(a_round(2))
    writer.finish()
    assert load_results(tmp_path) == json.loads(json.dumps(writer.doc | {"rounds_file": "rounds.jsonl",
                                                                          "devices_file": "devices.jsonl"}))
    assert [d["node_id"] for d in load_results(tmp_path)["devices"]] == [0, 1, 2, 3]
    assert load_results(str(tmp_path)) == load_results(tmp_path)  # a folder given as a string too


def test_a_line_cut_short_by_a_crash_is_left_out(tmp_path):
    writer = ResultsWriter(tmp_path, {"seed": 0}, devices(2))
    writer.add_round(a_round(1))
    with open(tmp_path / "rounds.jsonl", "a") as f:
        f.write(json.dumps(a_round(2))[:40])  # the crash came mid-append
    assert [r["round"] for r in load_results(tmp_path)["rounds"]] == [1]


def test_a_resumed_writer_rewrites_the_lines_from_its_checkpoint(tmp_path):
    writer = ResultsWriter(tmp_path, {"seed": 0}, devices(2))
    for n in (1, 2, 3):
        writer.add_round(a_round(n))
    checkpoint = json.loads(json.dumps(writer.doc))
    checkpoint["rounds"] = checkpoint["rounds"][:2]  # the checkpoint was taken after round 2
    resumed = ResultsWriter(tmp_path, {"seed": 0}, devices(2), doc=checkpoint)
    assert [r["round"] for r in load_results(tmp_path)["rounds"]] == [1, 2]
    resumed.add_round(a_round(3))
    assert [r["round"] for r in load_results(tmp_path)["rounds"]] == [1, 2, 3]


def test_results_written_before_the_jsonl_files_still_load(tmp_path):
    doc = {"status": "completed", "error": None, "config": {}, "devices": devices(2), "rounds": [a_round(1)],
           "summary": {}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert load_results(tmp_path) == doc


@pytest.mark.parametrize("content, says", [(None, "cannot read"), ("{", "cannot read"), ("[1]", "JSON object")])
def test_unreadable_results_are_one_clear_error(tmp_path, content, says):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    with pytest.raises(ResultsError, match=says):
        load_results(tmp_path)
