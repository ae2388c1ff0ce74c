"""Device profiles: the shipped files, the loader's error messages, device mixes, and the measurer."""

from __future__ import annotations

import math
import tomllib

import pytest

from fl_app.measure import main as measure_main
from fl_app.measure import measure_gflops, measure_matmul_gflops, measure_memory_mb
from fl_app.profiles import (NUMERIC_FIELDS, PHYSICAL_RANGES, PROFILES_DIR, ProfileError, available_profiles,
                             load_profile, parse_device_mix, physical_range_problem, profile_from_report)

REQUIRED = ("raspberry-pi-3b-plus", "raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano",
            "laptop", "workstation")
PROFILE_FILES = sorted(PROFILES_DIR.glob("*.toml"))
# Every number says what kind of number it is: a measurement, or an estimate/assumption with its working.
SOURCE_KINDS = ("measured", "estimate", "assumption", "given on the command line")

GOOD = {"name": "x", "description": "test device", "gflops": 1.0, "memory_mb": 100, "uplink_mbps": 1.0,
        "downlink_mbps": 2.0}


def write_toml(path, data: dict) -> str:
    lines = [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in data.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --- the shipped profiles -------------------------------------------------------------------------

def test_the_required_device_profiles_exist():
    assert set(REQUIRED) <= set(available_profiles())


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_profile_file_loads_is_named_after_its_file_and_sources_every_number(path):
    profile = load_profile(str(path))
    assert profile.name == path.stem
    assert load_profile(path.stem) == profile  # by name, as the device mix refers to it
    assert profile.description
    for key in NUMERIC_FIELDS:
        source = profile.sources.get(key, "")
        assert source.strip(), f"{path.name}: no [sources] entry for {key}"
        assert any(kind in source for kind in SOURCE_KINDS), f"{path.name}: {key} source says neither " \
                                                             f"measured nor estimate/assumption"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_a_profile_round_trips_through_to_toml(path):
    profile = load_profile(str(path))
    assert tomllib.loads(profile.to_toml())["gflops"] == pytest.approx(profile.gflops, rel=1e-5)


def test_compute_grows_from_the_weakest_board_to_the_workstation():
    gflops = [load_profile(n).gflops for n in ("raspberry-pi-3b-plus", "raspberry-pi-4", "raspberry-pi-5",
                                                "laptop", "workstation")]
    assert gflops == sorted(gflops) and len(set(gflops)) == len(gflops)


def test_memory_budgets_span_a_1gb_board_to_a_workstation():
    pi3, ws = load_profile("raspberry-pi-3b-plus").memory_mb, load_profile("workstation").memory_mb
    assert pi3 < ws
    assert pi3 <= 512 and ws >= 16 * 1024  # a 1 GB Pi cannot give a job more than half; tens of GB


# --- loader errors name the problem ---------------------------------------------------------------

def test_an_unknown_profile_name_lists_the_valid_names():
    with pytest.raises(ProfileError, match="unknown device profile 'no-such-board'") as err:
        load_profile("no-such-board")
    assert "raspberry-pi-4" in str(err.value) and "laptop" in str(err.value)


def test_a_missing_profile_file_is_named_as_a_file(tmp_path):
    with pytest.raises(ProfileError, match="profile file .*board.toml' does not exist"):
        load_profile(str(tmp_path / "board.toml"))


def test_a_profile_missing_a_key_says_which(tmp_path):
    data = {k: v for k, v in GOOD.items() if k != "gflops"}
    with pytest.raises(ProfileError, match=r"missing keys \['gflops'\]"):
        load_profile(write_toml(tmp_path / "x.toml", data))


def test_a_negative_gflops_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="gflops must be a positive number"):
        load_profile(write_toml(tmp_path / "x.toml", {**GOOD, "gflops": -3.0}))


# Values in the wrong unit (issue #23 item 7): refused with the likely mistake and the value to write.
WRONG_UNITS = [
    ("gflops", 4.8e9, r"gflops = 4\.8e\+09 is outside the physical range 0\.01-1e\+06 GFLOPS; it looks like FLOPS: "
                      r"write 4\.8 \(GFLOPS\)"),
    ("gflops", 1e300, r"gflops = 1e\+300 is outside the physical range 0\.01-1e\+06 GFLOPS$"),
    # 2 GiB written in bytes: read as MB, 2 PB
    ("memory_mb", 2 * 2**30, r"memory_mb = 2\.14748e\+09 is outside the physical range 1-1\.67772e\+07 MB "
                             r"\(2\^20 bytes\); it looks like bytes: write 2048 \(MB"),
    ("memory_mb", 4 * 2**30, r"it looks like bytes: write 4096 \(MB"),
    ("memory_mb", 0.5, r"it looks like GB \(2\^30 bytes\): write 512 \(MB"),
    ("uplink_mbps", 20e6, r"uplink_mbps = 2e\+07 .*it looks like bit/s: write 20 \(Mbit/s\)"),
    ("downlink_mbps", 5e9, r"downlink_mbps = 5e\+09 .*it looks like bit/s: write 5000 \(Mbit/s\)"),
]


@pytest.mark.parametrize(("key", "value", "message"), WRONG_UNITS)
def test_a_profile_number_in_the_wrong_unit_is_refused_naming_the_likely_mistake(tmp_path, key, value, message):
    with pytest.raises(ProfileError, match=message):
        load_profile(write_toml(tmp_path / "p.toml", {**GOOD, key: value}))


@pytest.mark.parametrize(("key", "value", "message"), WRONG_UNITS)
def test_a_node_reporting_a_number_in_the_wrong_unit_is_refused_alike(key, value, message):
    report = {"profile": "x", **{k: float(v) for k, v in GOOD.items() if k in NUMERIC_FIELDS}, key: value}
    with pytest.raises(ProfileError, match=message.rstrip("$")):
        profile_from_report(report, "of node 7")


def test_the_edges_of_the_physical_ranges_are_accepted(tmp_path):
    for key, (low, high, unit) in PHYSICAL_RANGES.items():
        assert physical_range_problem(key, low) is None and physical_range_problem(key, high) is None, unit
        assert physical_range_problem(key, high * 1.01) and physical_range_problem(key, low * 0.99)


def test_a_device_mix_naming_a_profile_in_the_wrong_unit_stops_the_run_config(tmp_path):
    from fl_app.config import ConfigError, RunConfig

    path = write_toml(tmp_path / "flops.toml", {**GOOD, "gflops": 4.8e9})
    with pytest.raises(ConfigError, match=r"device-mix.*looks like FLOPS"):
        RunConfig.from_mapping({"device-mix": f"{path}:2"})


def test_a_file_that_is_not_toml_is_refused(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("this is = = not toml [\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(path))


def test_a_valid_file_anywhere_loads_by_path(tmp_path):
    assert load_profile(write_toml(tmp_path / "x.toml", GOOD)).gflops == 1.0


# --- device mixes ---------------------------------------------------------------------------------

def test_a_device_mix_expands_in_order():
    assert parse_device_mix("raspberry-pi-4:2,laptop:1") == ["raspberry-pi-4", "raspberry-pi-4", "laptop"]


@pytest.mark.parametrize("mix", ["laptop:0", "laptop:x", "nope:1", ""])
def test_a_bad_device_mix_is_refused(mix):
    with pytest.raises(ProfileError):
        parse_device_mix(mix)


# --- the measurer ---------------------------------------------------------------------------------

def test_the_measurer_times_real_training_work_and_says_so():
    gflops, source = measure_gflops(seconds=0.3, repeats=3)
    assert math.isfinite(gflops) and gflops > 0
    assert "measured" in source and "fwd+bwd" in source and "matmul" in source
    assert '"' not in source  # it goes into a TOML string unescaped


def test_the_matmul_reference_is_positive():
    assert 0 < measure_matmul_gflops(seconds=0.1, repeats=2) < math.inf


def test_the_memory_budget_is_a_fraction_of_what_is_available():
    mb, source = measure_memory_mb(0.5)
    assert mb > 0 and "measured" in source
    with pytest.raises(ValueError):
        measure_memory_mb(1.5)


def test_the_cli_writes_a_profile_that_loads_back_and_will_not_overwrite_it(tmp_path, capsys):
    out = tmp_path / "my-board.toml"
    args = ["--out", str(out), "--seconds", "0.2", "--uplink-mbps", "12", "--memory-fraction", "0.5"]
    assert measure_main(args) == 0
    profile = load_profile(str(out))
    assert profile.name == "my-board" and profile.uplink_mbps == 12 and profile.gflops > 0
    assert "not measured" in profile.sources["uplink_mbps"]
    assert "assumed" in profile.sources["downlink_mbps"]  # not given: recorded as the CLI's default
    assert capsys.readouterr().out == out.read_text()  # it prints what it writes

    before = out.read_text()
    with pytest.raises(SystemExit) as exit_:
        measure_main(args)
    assert exit_.value.code == 2 and out.read_text() == before
    assert "already exists; pass --force" in capsys.readouterr().err
    assert measure_main([*args, "--force"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--seconds", "x"], "'x' is not a number"),
    (["--uplink-mbps", "-1"], "must be a positive number"),
    (["--memory-fraction", "2"], "must be in (0, 1]"),
    (["--out", "/no/such/folder/x.toml"], "does not exist"),
    (["--name", "a", "--out", "b.toml"], "must match"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        measure_main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
