"""Kill injection for the crash-safety tests: run a function in a forked child that kills itself
(`os._exit`, as abrupt as SIGKILL: no cleanup, no `finally`) just before its k-th file-system change.

The changes are seen through Python's audit hooks (`sys.addaudithook`, in the child only): a file
opened for writing (`open`, `os.open`, `tempfile.mkstemp`), `os.mkdir`, `os.rename` / `os.replace`,
`os.remove` / `os.unlink` (`shutil.rmtree` included), `os.rmdir`, `os.truncate`, links. A writer in C
(torch's and safetensors' own file writers) is not seen, so minippo hands them files that Python opened
(`fileio.write_binary`) or temporary files that Python made and renames (`fileio.atomic_write`)."""

import os
import sys

KILLED = 77  # the child's exit status when it killed itself
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.link", "os.symlink"}


def is_change(event: str, args: tuple) -> bool:
    """Whether an audit event changes the file system."""
    if event == "open":
        return bool(args[2] & WRITE_FLAGS)
    return event in CHANGES


def run_killed_at(k: int, function, *args) -> bool:
    """Run ``function(*args)`` in a forked child that exits with status KILLED just before its k-th
    file-system change. True if it was killed there, False if it finished first (fewer changes)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            changes = [0]

            def hook(event, hook_args):
                if is_change(event, hook_args):
                    changes[0] += 1
                    if changes[0] == k:
                        os._exit(KILLED)

            sys.addaudithook(hook)
            function(*args)
            status = 0
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    assert status in (0, KILLED), f"the child failed (exit status {status})"
    return status == KILLED


def kill_points(function, *args, before=None, after=None) -> int:
    """Kill ``function(*args)`` at its 1st, 2nd, ... file-system change in turn, until it finishes
    unkilled; ``before()`` runs before each try (to set the files up), ``after(killed)`` after it (to
    check them). Returns the number of kill points, one per change."""
    k = 0
    while True:
        k += 1
        if before is not None:
            before()
        killed = run_killed_at(k, function, *args)
        if after is not None:
            after(killed)
        if not killed:
            return k - 1
