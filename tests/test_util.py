"""util.py as a specification: a user's mistake is one line and exit code 2, a bug keeps its traceback, and a
file is written whole or not at all."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repository root

from util import UsageError, exit_on_usage_error, write_atomically  # noqa: E402


def test_a_usage_error_is_one_line_on_stderr_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as stopped, exit_on_usage_error():
        raise UsageError('--batch 0: accepted an integer >= 1')
    assert stopped.value.code == 2 and capsys.readouterr().err == 'error: --batch 0: accepted an integer >= 1\n'


def test_any_other_exception_is_a_bug_and_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError), exit_on_usage_error():
        1 / 0


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    out = tmp_path / 'samples.npz'
    out.write_bytes(b'samples of an earlier run')

    def write_half_then_die(tmp):
        Path(tmp).write_bytes(b'half a')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(out), write_half_then_die)
    assert os.listdir(tmp_path) == ['samples.npz'] and out.read_bytes() == b'samples of an earlier run'
