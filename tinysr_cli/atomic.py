"""Write files so that nothing appears under the final name until it is complete."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final``; rename it onto ``final`` if the block succeeds.

    On any failure (including Ctrl-C) the temporary file is removed and ``final`` is untouched.
    The file is created by the caller with ordinary permissions (the umask applies).
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.part")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
