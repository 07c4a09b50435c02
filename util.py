"""
What every script of this repository shares: the one error class for a user's mistakes, how a script turns it into
one line, writing a file (or a line of a log) whole, naming the OS error that stopped a write, and progress lines.

    from util import UsageError, exit_on_usage_error, write_atomically
    raise UsageError(f"--batch {batch}: accepted an integer >= 1")     # bad input: one 'error: ...' line, exit 2
    write_atomically('samples.npz', lambda tmp: np.savez(tmp, arr_0=x))  # the old file or the new one, never half
    append_line('runs/moons/log.jsonl', '{"step": 100}\n')              # the whole line or none of it
    progress = Progress('sample', 50000, 'samples'); progress.add(1024)    # a line on stderr every 10 s

A UsageError names the bad value and what is accepted. Anything else that goes wrong is a bug and keeps its traceback.
"""
import contextlib
import errno
import os
import sys
import time


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


def append_line(path, line):
    """Append one line to a text file whole or not at all: a failed write (a full disk) cuts the file back to where
    it ended and raises, so the next line does not continue a broken one."""
    with open(path, 'ab', buffering=0) as f:   # unbuffered: each write reaches the file or raises now
        end = f.seek(0, os.SEEK_END)
        try:
            data = memoryview(line.encode())
            while data:
                data = data[f.write(data):]        # a short write is followed by one that raises
        except OSError:
            f.truncate(end)
            raise


def os_error_text(e):
    """An OSError as its message and symbol, without the file name: 'No space left on device [ENOSPC]'."""
    return f"{e.strerror} [{errno.errorcode.get(e.errno, e.errno)}]" if e.errno else str(e)


class Progress:
    """Progress of long work: a line on stderr about every 10 s and at the end, done/total, rate and time left.
    Silent without a label."""

    def __init__(self, label, total, unit):
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.start = self.last = time.time()

    def add(self, count):
        self.done += count
        now = time.time()
        if self.label and (now - self.last > 10 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f'{self.label}: {self.done:,}/{self.total:,} {self.unit}, {rate:.4g} {self.unit}/s, '
                  f'{now - self.start:.0f} s, ETA {(self.total - self.done) / rate:.0f} s', file=sys.stderr, flush=True)
