"""`python tests/_disk_full.py STEP train.py-args...`: train.py with a disk that fills
up while checkpoint step STEP is written.

Orbax's writes of a step's small files (its commit marker and metadata) go through
`orbax.checkpoint._src.path.async_path.write_text`; for paths of step STEP it raises
OSError(ENOSPC), as a full disk did in a real run on a small tmpfs (the first failed
write there was the same call, finalising the step), everything else is written.
"""

from __future__ import annotations

import errno
import os
import re
import runpy
import sys
from typing import Any

from orbax.checkpoint._src.path import async_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = sys.argv.pop(1)
_step_dir = re.compile(rf"[/\\]checkpoints[/\\]{STEP}(\.|[/\\]|$)")
_write_text = async_path.write_text


async def _full_disk_write_text(path: Any, text: str) -> int:
    if _step_dir.search(str(path)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await _write_text(path, text)


async_path.write_text = _full_disk_write_text
sys.argv[0] = os.path.join(REPO, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
