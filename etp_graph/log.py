"""One logger, ``etp_graph`` (quiet unless the user configures logging: ``-v`` on the command
line), and progress bars that show on a terminal only."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable, Iterator, Optional

from tqdm.auto import tqdm

__all__ = ["log", "progress", "phase"]

log = logging.getLogger("etp_graph")


def progress(items: Iterable, desc: str, total: Optional[int] = None):
    """``items`` with a tqdm bar on a terminal (none when stderr is not one, e.g. in CI)."""
    return tqdm(items, desc=desc, total=total, leave=False, disable=None)


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """Logs ``what`` and how long it took (at INFO)."""
    t0 = time.perf_counter()
    yield
    log.info("%s: %.2f s", what, time.perf_counter() - t0)
