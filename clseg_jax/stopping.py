"""Stopping a run inside a long between-phase hook (a synthesis of thousands of iterations).

The trainer gives ``base.Env.stop`` a callable that says whether the run was asked to stop
(SIGTERM, or the service's cancel); a hook that loops checks it and raises ``Stopped``. The
trainer then saves the state the phase's training ended with, so a resumed run redoes the hooks
from there.
"""

from __future__ import annotations


class Stopped(Exception):
    """A between-phase hook stopped because the run was asked to."""


def never() -> bool:
    """The stop check of a run nobody can stop (tests, hand-built envs)."""
    return False
