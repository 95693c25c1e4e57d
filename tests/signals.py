"""The resume tests' kill switch: a process sends itself a real signal (SIGKILL, SIGTERM, ...) right after a given
micro-batch (counted from the start of training) has been through forward and backward, by patching
:meth:`speft.recipe.Recipe.micro_batch`; the library itself carries no test hook.

The spec reads ``<micro-batch>:<SIGNAL>[:<rank>]`` (with a rank, only that data-parallel rank). In the test's own
process: ``signal_after(monkeypatch, "4:SIGTERM")``. In child processes (``run.py``, torchrun's workers, a submitit
job): ``child_env(env, "5:SIGKILL")`` puts ``tests/hooks`` on their ``PYTHONPATH``, whose ``sitecustomize`` applies
the same patch when the interpreter starts."""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "SPEFT_TEST_SIGNAL_AT_MICRO"
HOOKS = Path(__file__).resolve().parent / "hooks"


def patch(set_attribute, spec: str) -> None:
    """Replace ``Recipe.micro_batch`` (through ``set_attribute``: ``setattr`` or ``monkeypatch.setattr``) by one
    that signals after micro-batch ``n``; nothing for another rank."""
    at, name, rank = (spec.split(":") + ["", ""])[:3]
    if rank and int(rank) != int(os.environ.get("RANK", "0")):
        return
    from speft.recipe import Recipe

    original, micro, signum = Recipe.micro_batch, int(at), getattr(signal, name or "SIGKILL")

    def micro_batch(self, batch):
        original(self, batch)
        if self.state.micro == micro:
            os.kill(os.getpid(), signum)

    set_attribute(Recipe, "micro_batch", micro_batch)


def signal_after(monkeypatch, spec: str) -> None:
    patch(monkeypatch.setattr, spec)


def child_env(env: dict, spec: str | None) -> dict:
    """``env`` for a child process that signals itself per ``spec`` (None: one that does not)."""
    env = {k: v for k, v in env.items() if k != ENV}
    if spec:
        env[ENV] = spec
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOKS), env.get("PYTHONPATH")) if p)
    return env
