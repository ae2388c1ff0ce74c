"""The virtual clock: a device's emulated pace decides deadlines, dropouts and time-to-accuracy."""

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from experiments.inprocess import InProcessGrid
from fl_app.config import ConfigError
from fl_app.profiles import ProfileError, load_profile, profile_from_report, profile_report
from fl_app.report import build_report, load_run, time_to_accuracy
from server_app.clock import NodeAvailability, load_availability_trace
from server_app.server_app import main
from fl_app.results import load_results

PI_AND_LAPTOP = "raspberry-pi-3b-plus:1,laptop:1"


def run(tmp_path, name="run", **overrides):
    config = {"strategy": "fedavg", "memory-pool": "", "num-server-rounds": 2, "device-mix": PI_AND_LAPTOP, "output-dir": str(tmp_path), "run-name": name,
              "public-size": 50, "max-client-examples": 64, "test-size": 100, **overrides}
    main(InProcessGrid(config, 2), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=config))
    return load_results(tmp_path / name)


def by_profile(round_record):
    return {c["profile"]: c for c in round_record["clients"]}


def test_without_a_deadline_a_round_lasts_as_long_as_its_slowest_client(tmp_path):
    results = run(tmp_path)
    for r in results["rounds"]:
        clients = by_profile(r)
        assert clients["raspberry-pi-3b-plus"]["device_time_s"] > 10 * clients["laptop"]["device_time_s"]
        assert r["emulated_round_s"] == pytest.approx(clients["raspberry-pi-3b-plus"]["device_time_s"])
    clock = [r["emulated_clock_s"] for r in results["rounds"]]
    assert clock[1] == pytest.approx(clock[0] + results["rounds"][1]["emulated_round_s"])
    assert results["summary"]["emulated_time_s"] == pytest.approx(clock[-1])


def test_a_pi_misses_an_emulated_deadline_that_a_laptop_meets(tmp_path):
    baseline = run(tmp_path, "baseline", **{"num-server-rounds": 1})["rounds"][0]
    pi_s, laptop_s = (by_profile(baseline)[p]["device_time_s"] for p in ("raspberry-pi-3b-plus", "laptop"))
    deadline = (pi_s + laptop_s) / 2
    r = run(tmp_path, **{"num-server-rounds": 1, "emulated-deadline": deadline})["rounds"][0]
    pi, laptop = by_profile(r)["raspberry-pi-3b-plus"], by_profile(r)["laptop"]
    assert laptop["participated"] and laptop["error"] is None
    assert not pi["participated"] and "missed the emulated deadline" in pi["error"]
    assert pi["bytes_up"] > 0 and r["bytes_up"] == pi["bytes_up"] + laptop["bytes_up"]  # its traffic still counts
    assert r["missed_deadline"] == 1 and r["participants"] == 1
    assert r["emulated_round_s"] == pytest.approx(deadline)  # the server waited until the deadline


def test_a_node_offline_in_the_trace_is_not_sampled_and_the_run_goes_on(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"offline": {"raspberry-pi-3b-plus": [[0, 1e9]]}}))
    results = run(tmp_path, **{"availability-trace": str(trace)})
    assert results["status"] == "completed"
    for r in results["rounds"]:
        pi = by_profile(r)["raspberry-pi-3b-plus"]
        assert not pi["participated"] and pi["left_out"].startswith("offline at emulated t")
        assert r["left_out_by_kind"] == {"offline": 1} and r["participants"] == 1


def test_a_node_that_goes_offline_mid_round_drops_out_and_its_upload_never_arrives(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"offline": {"0": [[0.5, 1e9]]}}))  # partition 0: the Pi, gone after 0.5 s
    results = run(tmp_path, **{"availability-trace": str(trace)})
    first, second = results["rounds"]
    pi = by_profile(first)["raspberry-pi-3b-plus"]
    assert not pi["participated"] and pi["error"].startswith("dropped out: offline from emulated t = 0.50 s")
    assert pi["bytes_down"] > 0 and pi["bytes_up"] == 0
    assert first["dropped_out"] == 1 and results["summary"]["dropped_out"] == 1
    assert by_profile(second)["raspberry-pi-3b-plus"]["left_out"].startswith("offline")


def test_an_on_off_model_is_seeded_and_online_for_its_stationary_share_of_time():
    def model(seed):
        return NodeAvailability.on_off(300.0, 100.0, np.random.default_rng(seed))

    times = np.linspace(0, 2e6, 20_000)
    a, b, other = model(1), model(1), model(2)
    online = [a.online_at(t) for t in times]
    assert online == [b.online_at(t) for t in times]
    assert np.mean(online) == pytest.approx(0.75, abs=0.03)
    assert online != [other.online_at(t) for t in times]


def test_offline_between_finds_the_first_offline_moment():
    node = NodeAvailability([(10.0, 20.0), (30.0, 40.0)])
    assert node.online_at(5) and not node.online_at(10) and node.online_at(20)
    assert node.offline_between(0, 10) is None
    assert node.offline_between(0, 11) == 10.0
    assert node.offline_between(15, 16) == 15.0
    assert node.offline_between(21, 35) == 30.0


@pytest.mark.parametrize("content, says", [
    ("not json", "not valid JSON"),
    ('{"nodes": {}}', 'no "offline" table'),
    ('{"offline": {"0": [[5, 1]]}}', "0 <= start < end"),
    ('{"offline": {"0": [5, 1]}}', "not a list of [start_s, end_s] pairs"),
])
def test_a_bad_trace_is_one_clear_line(tmp_path, content, says):
    path = tmp_path / "trace.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="availability-trace") as exc:
        load_availability_trace(str(path))
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_a_bad_trace_stops_the_run_before_training(tmp_path):
    with pytest.raises(ConfigError):
        run(tmp_path, **{"availability-trace": str(tmp_path / "missing.json")})
    results = load_results(tmp_path / "run")
    assert results["status"] == "failed" and results["stopped_before_training"]
    assert "availability-trace" in results["error"] and "cannot read it" in results["error"]


def test_a_profile_carries_its_availability_through_the_device_report(tmp_path):
    path = tmp_path / "phone-charging.toml"
    path.write_text(load_profile("phone").to_toml() + "\n[availability]\nmean_online_s = 3600\nmean_offline_s = 600\n")
    profile = load_profile(str(path))
    assert (profile.mean_online_s, profile.mean_offline_s) == (3600, 600)
    assert profile_from_report(profile_report(profile), "test") == profile.__class__(
        **{**profile.__dict__, "description": "", "sources": {}})
    assert "mean_online_s" not in profile_report(load_profile("phone"))  # always online: nothing extra sent


def test_availability_needs_both_means(tmp_path):
    path = tmp_path / "half.toml"
    path.write_text(load_profile("phone").to_toml() + "\n[availability]\nmean_online_s = 3600\n")
    with pytest.raises(ProfileError, match="give both as positive seconds"):
        load_profile(str(path))


def test_the_report_gives_time_to_accuracy_on_the_virtual_clock(tmp_path):
    run(tmp_path, "fedavg")
    files = build_report([tmp_path / "fedavg"], tmp_path / "report", dpi=50, target_accuracy=0.01)
    assert (tmp_path / "report" / "accuracy_vs_emulated_time.png").is_file()
    loaded = load_run(tmp_path / "fedavg")
    assert time_to_accuracy(loaded, 0.01) == pytest.approx(loaded.rounds[0]["emulated_clock_s"])
    assert time_to_accuracy(loaded, 1.01) is None
    assert "to target s" in files.summary_md.read_text()


def test_the_planner_predicts_who_misses_the_emulated_deadline(tmp_path):
    from server_app.plan import make_plan

    config = {"device-mix": PI_AND_LAPTOP, "public-size": 50, "max-client-examples": 64, "test-size": 100,
              "num-server-rounds": 1, "emulated-deadline": 1.0}
    results = run(tmp_path, **config)
    planned = make_plan(config, strategies=["fedavg"]).strategies[0].round_summary(1)
    recorded = results["rounds"][0]
    missed = {c["node_id"] for c in recorded["clients"] if c["error"] and "emulated deadline" in c["error"]}
    assert missed and set(planned["missed_deadline"]) == missed
    assert planned["seconds_under_deadline"] == recorded["emulated_round_s"] == 1.0


def test_a_trace_key_that_names_no_node_is_warned_about(tmp_path, caplog):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"offline": {"raspbery-pi-4": [[0, 10]]}}))  # a typo
    with caplog.at_level("WARNING"):
        results = run(tmp_path, **{"availability-trace": str(trace), "num-server-rounds": 1})
    assert results["status"] == "completed"
    assert any("['raspbery-pi-4'] name no node's partition id or profile" in r.getMessage() for r in caplog.records)
