"""Run the real `tinysr` entry point in a subprocess, as a user would."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """``prefix`` goes before the interpreter (e.g. ``file_modes_prefix()[0]``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tinysr_cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300,
    )


# Root ignores file modes through two capabilities; without them in its bounding set a command run as
# root is refused an unreadable file (mode 0) like any user. CI runs as root.
_DROP_OVERRIDES = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


@functools.cache
def file_modes_prefix() -> tuple[tuple[str, ...], str]:
    """(prefix for ``run_cli`` under which file modes hold, reason) -- prefix None when impossible."""
    if os.geteuid() != 0:
        return (), "not root"
    if shutil.which("setpriv") is None:
        return None, "running as root and setpriv (util-linux) is not installed to drop CAP_DAC_OVERRIDE"
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        result = subprocess.run([*_DROP_OVERRIDES, "cat", str(probe)], capture_output=True, text=True)
    if result.returncode == 0 or "Permission denied" not in result.stderr:
        return None, f"running as root and dropping CAP_DAC_OVERRIDE did not work here: {result.stderr.strip()!r}"
    return _DROP_OVERRIDES, "root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH"


def _run_quiet(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[str | None]:
    """Make ``folder`` unwritable for the duration, even for root; yields how, or None if impossible.

    Not root: mode 0o555. Root: a read-only bind mount of the folder onto itself, else the immutable
    attribute (chattr +i; ext4, xfs, btrfs), else nothing (the caller skips, saying why).
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield "mode 0o555"
        finally:
            folder.chmod(0o755)
        return
    if _run_quiet("mount", "--bind", str(folder), str(folder)):
        try:
            if _run_quiet("mount", "-o", "remount,ro,bind", str(folder)):
                yield "read-only bind mount"
                return
        finally:
            _run_quiet("umount", str(folder))
    if shutil.which("chattr") and _run_quiet("chattr", "+i", str(folder)):
        try:
            yield "chattr +i"
        finally:
            _run_quiet("chattr", "-i", str(folder))
        return
    yield None


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }
