"""util.py as a specification: a user's mistake is one line and exit code 2, a bug keeps its traceback, and a
file (or a line of a log) is written whole or not at all."""
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


def test_a_log_line_that_does_not_fit_is_cut_back_and_its_os_error_named(tmp_path):
    import resource
    import subprocess
    script = ("from util import append_line, os_error_text\n"
              "try:\n"
              "    for i in range(10):\n"
              "        append_line('log.jsonl', f'{{\"step\": {i}, \"loss\": 0.123456789}}\\n')\n"
              "except OSError as e:\n"
              "    print(i, os_error_text(e))\n")
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)))
    assert result.stdout == '3 File too large [EFBIG]\n', result.stderr    # lines of 32 bytes: 3 fit in 100
    assert (tmp_path / 'log.jsonl').read_text().splitlines() == [f'{{"step": {i}, "loss": 0.123456789}}' for i in range(3)]
