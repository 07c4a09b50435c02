"""
What every script of this repository shares: the one error class for a user's mistakes, how a script turns it into
one line, and writing a file whole.

    from util import UsageError, exit_on_usage_error, write_atomically
    raise UsageError(f"--batch {batch}: accepted an integer >= 1")     # bad input: one 'error: ...' line, exit 2
    write_atomically('samples.npz', lambda tmp: np.savez(tmp, arr_0=x))  # the old file or the new one, never half

A UsageError names the bad value and what is accepted. Anything else that goes wrong is a bug and keeps its traceback.
"""
import contextlib
import os
import sys


class UsageError(Exception):
    """Bad input from the user: the scripts print the message alone (no traceback) and exit with code 2."""


@contextlib.contextmanager
def exit_on_usage_error():
    """Every script's entry point: a UsageError becomes one 'error: ...' line on stderr and exit code 2."""
    try:
        yield
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


def write_atomically(path, write):
    """write(tmp), then rename tmp onto path: an interrupted run leaves the old file (or none), never half a file."""
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{os.getpid()}{ext}'  # keeps the extension: np.savez and PIL look at it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
