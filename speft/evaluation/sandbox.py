"""Run model-written Python in a separate, confined process, never in the training process.

Each program runs as ``python -I`` in its own session, in a fresh temporary directory that is its working
directory and its only writable place, with:

* a wall-clock timeout (the whole process group is killed when it passes),
* resource limits: CPU seconds, address space, file size, open files, and the number of processes,
* an unprivileged user (``nobody``) when this process runs as root, so it can neither write the run
  folder nor signal this process; otherwise a guard inside the program disables the functions that
  fork, kill, delete or change directory (after HumanEval's ``reliability_guard``),
* no network: a new, empty network namespace where the kernel allows it (as root), and ``socket`` disabled
  in the program either way,
* an environment holding only ``PATH`` and ``PYTHONHASHSEED``.

A program that loops, forks, allocates without bound, touches files outside its directory, opens a
socket or signals its parent fails (its status says how); nothing else is affected. Executing needs an
explicit opt-in (:func:`check_opt_in`).
"""

from __future__ import annotations

import functools
import os
import pwd
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OPT_IN_ENV = "HF_ALLOW_CODE_EVAL"  # the harness's switch, honoured too
OPT_IN_HINT = ("executing model-written code needs an opt-in: task.allow_code_execution=true (or "
               f"{OPT_IN_ENV}=1; the scoring command: --allow-exec). It runs confined (speft.evaluation.sandbox) "
               "but is still untrusted code")


class ExecutionRefused(PermissionError):
    """Model-written code would run without the user's opt-in."""


def check_opt_in(allowed: bool) -> None:
    if not (allowed or os.environ.get(OPT_IN_ENV) == "1"):
        raise ExecutionRefused(OPT_IN_HINT)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock (the harness's HumanEval timeout is 3 s; CPU here is slower)
    cpu_s: int = 10  # CPU seconds
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    processes: int = 16  # processes of the sandbox user (applies to an unprivileged user)
    open_files: int = 64


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout
    returncode: int | None
    stderr: str  # its last lines


# Runs first inside the program: no fork, no kill, no deletion, no chdir, no sockets.
GUARD = r'''
import builtins, os, shutil, socket, subprocess, sys
def _refused(*args, **kwargs):
    raise PermissionError("disabled in the sandbox")
for _name in ("fork", "forkpty", "kill", "killpg", "system", "execv", "execve", "execvp", "execvpe", "spawnv",
              "spawnve", "posix_spawn", "posix_spawnp", "remove", "removedirs", "rmdir", "unlink", "rename",
              "renames", "replace", "truncate", "chdir", "fchdir", "chroot", "chmod", "chown", "setuid", "putenv"):
    if hasattr(os, _name):
        setattr(os, _name, _refused)
shutil.rmtree = shutil.move = shutil.chown = _refused
subprocess.Popen = _refused
socket.socket = socket.create_connection = socket.socketpair = _refused
sys.modules["multiprocessing"] = None
sys.modules["ctypes"] = None
del builtins, os, shutil, socket, subprocess, sys, _name, _refused
'''


def _world_runnable(path: Path) -> bool:
    """Whether any user may run ``path``: it and every folder above it are executable by others."""
    path = path.resolve()
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents)) if path.exists() else False


def _interpreter() -> tuple[str, tuple[int, int] | None]:
    """The Python to run programs with, and the (uid, gid) of ``nobody`` to run them as when this process is
    root and some Python is runnable by that user (the project's own may sit in root's home); else this
    process's own Python and user (the guard then does the confining)."""
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            user = None
        for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            if user is not None and _world_runnable(Path(candidate)):
                return str(Path(candidate).resolve()), (user.pw_uid, user.pw_gid)
    return sys.executable, None


CLONE_NEWNET = 0x40000000


def _new_network_namespace() -> bool:
    """Move this (child) process into an empty network namespace: no interface but a downed loopback.
    Needs the privilege to (root here); False where it is refused."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def _limit(limits: Limits, ids: tuple[int, int] | None) -> None:
    """The child's confinement, run in it between fork and exec (``preexec_fn=functools.partial(_limit, ...)``)."""
    os.setsid()  # its own session: the whole group is killed at the timeout
    _new_network_namespace()  # before dropping privileges (the guard disables sockets either way)
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if ids is not None:  # root drops to nobody: RLIMIT_NPROC applies to it, root's files are out of reach
        os.setgroups([])
        os.setgid(ids[1])
        os.setuid(ids[0])
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def run_program(source: str, limits: Limits | None = None) -> Outcome:
    """Run ``source`` as a confined Python program; ``passed`` when it exits 0 within the limits."""
    limits = limits or Limits()
    python, ids = _interpreter()
    with tempfile.TemporaryDirectory(prefix="speft-sandbox-") as tmp:
        work = Path(tmp)
        program = work / "program.py"
        program.write_text(GUARD + "\n" + source)
        if ids is not None:
            os.chown(work, *ids)
            os.chown(program, *ids)
        cmd = [python, "-I", "-B", str(program)]
        proc = subprocess.Popen(cmd, cwd=work, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=functools.partial(_limit, limits, ids), text=True, errors="replace")
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            err, status = "", "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it left running in its session
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return Outcome(status == "passed", status, proc.returncode, (err or "")[-2000:])
