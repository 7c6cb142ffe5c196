"""Named crash points, for the tests that kill a run at a chosen moment and resume it.

The stage loops call `reached(point)` where a crash is worth testing: after an SFT or PRM
step (`"sft:<steps done>"`, `"prm:<steps done>"`, once pending checkpoint writes are
done), after a label shard is
written (`"collect:<batch>"`), and right after a checkpoint save has started, while it may
still be in flight (`"save:<stage dir>:<step>"`, e.g. `"save:rl:2"`). With the environment variable
`PSGPO_JAX_KILL_AT` set to a point's name, the process sends itself SIGKILL there: no
handler, no atexit, no flush, exactly like the OS killing it. Unset (always, outside
those tests) a point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

KILL_AT_ENV = "PSGPO_JAX_KILL_AT"


def reached(point: str, settle: Optional[Callable[[], None]] = None) -> None:
  """SIGKILLs this process if `point` is the one named by `$PSGPO_JAX_KILL_AT`.

  Args:
    point: the crash point's name.
    settle: called before the kill (e.g. a checkpointer's `wait`), so that the kill
      lands after the writes it lets finish: the resume then has a complete checkpoint
      to start from, which the test can check.
  """
  if os.environ.get(KILL_AT_ENV) == point:
    if settle is not None:
      settle()
    print(f"[faults] killing the process at {point}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
