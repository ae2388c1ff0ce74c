"""The root-run scripts (compose federation, Raspberry Pi emulation) trust only a cache folder of their own.

They keep a rootfs, Docker's data-root and wheels under /var/tmp, which anyone may write to, and run
what is there as root: scripts/root_cache.py refuses a folder owned by someone else or writable by
others, a symlink in its place, and a `lock` planted as a symlink (which root would otherwise
truncate). Each script refuses such a folder with one line before doing anything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.root_cache import CacheRefused, claim_cache, open_lock

REPO = Path(__file__).resolve().parents[1]


def _foreign_folder(tmp_path: Path) -> Path:
    """A folder that is not the current user's: made and handed to another uid as root, else /usr (root's)."""
    if os.geteuid() != 0:
        return Path("/usr")
    folder = tmp_path / "someone-elses"
    folder.mkdir(mode=0o755)
    os.chown(folder, 12345, 12345)
    return folder


def test_a_missing_cache_is_created_private_and_locked_without_trouble(tmp_path):
    cache = claim_cache(tmp_path / "cache")
    assert cache.is_dir() and cache.stat().st_mode & 0o777 == 0o700
    with open_lock(cache) as lock:
        lock.write("1")
    assert claim_cache(cache) == cache  # ours: accepted again


def test_a_cache_owned_by_another_user_is_refused(tmp_path):
    with pytest.raises(CacheRefused, match="owned by uid"):
        claim_cache(_foreign_folder(tmp_path))


def test_a_cache_others_may_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(CacheRefused, match="writable by group or others"):
        claim_cache(shared)


def test_a_symlink_in_place_of_the_cache_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    with pytest.raises(CacheRefused, match="symlink"):
        claim_cache(tmp_path / "cache")


def test_a_planted_lock_symlink_is_never_followed(tmp_path):
    cache = claim_cache(tmp_path / "cache")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (cache / "lock").symlink_to(victim)
    with pytest.raises(CacheRefused, match="lock"):
        open_lock(cache)
    assert victim.read_text() == "precious"


def test_a_cache_in_a_folder_anyone_may_rename_in_is_refused(tmp_path):
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # world-writable, no sticky bit
    with pytest.raises(CacheRefused, match="sticky"):
        claim_cache(open_parent / "cache")


def _refusal(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_the_compose_script_refuses_a_cache_it_does_not_own_before_doing_anything(tmp_path):
    proc = _refusal([sys.executable, "scripts/compose_federation.py"],
                    {"FL_COMPOSE_CACHE": str(_foreign_folder(tmp_path))})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "refused" in proc.stderr and "owned by uid" in proc.stderr
    assert "installing" not in proc.stdout and "dockerd" not in proc.stdout


def test_the_pi_emulation_script_refuses_a_cache_it_does_not_own_before_doing_anything(tmp_path):
    proc = _refusal(["bash", "scripts/emulate_pi.sh", "--no-federation", "--no-probe", "--out", str(tmp_path / "t")],
                    {"FL_PI_CACHE": str(_foreign_folder(tmp_path))})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("refused:") and "owned by uid" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "t").exists()
