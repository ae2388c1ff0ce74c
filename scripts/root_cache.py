#!/usr/bin/env python3
"""A cache folder a root-run script may trust, and its lock file, without following planted links.

    python scripts/root_cache.py /var/tmp/fl-app-pi     # scripts/emulate_pi.sh: exit 1 + one line if refused

scripts/compose_federation.py and scripts/emulate_pi.sh run as root and keep their caches (a
debootstrap tree, Docker's data-root, wheels) under /var/tmp, which every user may write to. Someone
else could create the folder first, fill it (a rootfs that root then chroots into, images dockerd
then runs) or plant `lock` as a symlink to a file that root would then truncate. So:

- a missing folder is created with mode 0700 (`mkdir` fails rather than reuse a name someone took
  between the check and the creation);
- an existing one is used only if it is a real directory (not a symlink: checked with lstat) owned by
  the user running the script (root) and writable by no one else (no group/other write bit);
- its parent must be writable by no one else, or carry the sticky bit (/var/tmp, /tmp: others may
  not rename or remove what is ours there);
- `lock` is opened with O_NOFOLLOW (a symlink there fails with ELOOP) and must be a regular file
  owned by us.

Anything else raises CacheRefused, whose message says which check failed and what to do.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import IO


class CacheRefused(RuntimeError):
    """The cache folder (or its lock) is not one a root-run script may trust."""


def _not_shared(st: os.stat_result) -> bool:
    return not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def claim_cache(path: Path | str) -> Path:
    """`path` as a private cache folder of the current user (created 0700 if missing).

    Raises CacheRefused (one line: the folder, the failed check, the fix) when it is a symlink or not
    a directory, is owned by another user, is group/other-writable, or sits in a folder others may
    write to without the sticky bit."""
    path = Path(path).absolute()
    me = os.geteuid()
    parent = os.stat(path.parent)  # the parent may be a link (/var/tmp on some systems): its target counts
    if not (_not_shared(parent) or parent.st_mode & stat.S_ISVTX):
        raise CacheRefused(f"cache folder {path}: its parent {path.parent} is writable by others without the "
                           "sticky bit, so the folder could be swapped; choose a cache path elsewhere")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise CacheRefused(f"cache folder {path} is a symlink or not a directory; remove it (or pick another "
                           "path) and run again")
    if st.st_uid != me:
        raise CacheRefused(f"cache folder {path} is owned by uid {st.st_uid}, not by this user (uid {me}): "
                           "someone else may have prepared it; remove it (or pick another path) and run again")
    if not _not_shared(st):
        raise CacheRefused(f"cache folder {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                           f"chmod go-w {path} if its content is yours, else remove it")
    return path


def open_lock(cache: Path) -> IO[str]:
    """The cache's `lock` file, opened for writing without following a symlink (ELOOP -> CacheRefused)."""
    lock = cache / "lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CacheRefused(f"lock file {lock}: {exc.strerror} (a symlink there is refused); remove it and run "
                           "again") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise CacheRefused(f"lock file {lock} is not a regular file of this user; remove it and run again")
    return os.fdopen(fd, "w")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/root_cache.py CACHE_FOLDER", file=sys.stderr)
        return 2
    try:
        claim_cache(args[0])
    except (CacheRefused, OSError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
