"""Progress bars (tqdm's, on stderr) for memboost's long passes, shown where
someone watches: on a terminal by default, never in a pipe or a test unless
asked. One place decides, so every pass behaves the same.

    for batch in progress_bar(batches, "calibration", unit="batch", progress=progress): ...

progress=True shows the bar, False never does, None (the default of every
pass) shows it when stderr is a terminal (tqdm's disable=None). The
environment variable MEMBOOST_PROGRESS=1 shows it wherever None applies (a
log file, a pipe), MEMBOOST_PROGRESS=0 hides it.
"""

import os
import sys
from typing import Iterable, Optional

PROGRESS_ENV = "MEMBOOST_PROGRESS"


def _asked(progress: Optional[bool]) -> Optional[bool]:
    if progress is None:
        progress = {"1": True, "0": False}.get(os.environ.get(PROGRESS_ENV, "").strip())
    return progress


def bars_shown(progress: Optional[bool] = None) -> bool:
    """Whether progress_bar would show a bar for this `progress` (for other libraries' bars)."""
    progress = _asked(progress)
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return progress


def progress_bar(items: Iterable, desc: str, unit: str = "it", total: Optional[int] = None,
                 progress: Optional[bool] = None):
    """`items`, wrapped in a tqdm bar when `progress` (see the module) says so."""
    progress = _asked(progress)
    if progress is False:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (transformers brings it)
        return items
    # disable=None: tqdm shows the bar only when its stream (stderr) is a terminal
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=None if progress is None else False)
