"""Write files so that nothing appears under the final name until it is complete.

Temporary files are hidden, short and owned by one process: ``.tinysr-PID-RANDOM.part`` beside
the final file. Their name does not grow with the final name (a legal 255-byte name stays
writable), and a run only ever removes the temporaries of processes that no longer exist, so two
runs writing one folder never delete each other's work.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tinysr-"
TEMP_SUFFIX = ".part"
_TEMP_NAME = re.compile(r"^\.tinysr-(\d+)-[0-9a-f]+\.part$")


def temporary_path(final: Path) -> Path:
    """A fresh hidden temporary name beside ``final``, owned by this process."""
    return Path(final).with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or cannot tell: leave its files alone
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Remove temporaries in ``folder`` left by processes that have ended (killed runs)."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            try:
                path.unlink()
            except OSError:
                pass


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final``; rename it onto ``final`` if the block succeeds.

    On any failure (including Ctrl-C, SIGTERM and SIGHUP, which the CLI turns into
    KeyboardInterrupt) the temporary file is removed and ``final`` is untouched. The file is
    created by the caller with ordinary permissions (the umask applies).
    """
    final = Path(final)
    tmp = temporary_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
