"""docs/experiments.py as a specification: a subcommand on a tiny budget prints its table and writes its pictures,
and its distance is zero for equal sets and grows as samples move away from the data."""
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'docs'))

import experiments  # noqa: E402


def test_toys_on_a_tiny_budget_prints_the_table_and_writes_the_pictures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, 'EVAL_POINTS', 500)
    table = experiments.main(['toys', '--iters', '3', '--toys', 'moons', '--out', str(tmp_path)])
    assert capsys.readouterr().out.strip() == table.strip()
    rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| method')]
    assert len(rows) == 3 * 3 + 1 and rows[-1].startswith('| noise floor')   # 3 methods x 3 step counts, floor
    assert all(len(row.split('|')) == 5 for row in rows)                      # method, steps, one toy
    for name in ('exp_toys.png', 'exp_steps.png'):
        with Image.open(tmp_path / name) as picture:
            assert min(picture.size) > experiments.PANEL              # at least one labelled panel


def test_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    a = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert abs(experiments.mmd2(a, a)) < 1e-12
    assert experiments.mmd2(a, a + 0.2) > experiments.mmd2(a, a + 0.05) > 0


def test_score_prints_one_row_per_train_py_run_and_its_floor(tmp_path, capsys, monkeypatch):
    import train
    monkeypatch.setattr(experiments, 'EVAL_POINTS', 300)
    run = tmp_path / 'moons'
    assert train.main(['--dataset', 'moons', '--iters', '2', '--batch', '32', '--channels', '16', '--out', str(run),
                       '--sample-every', '0', '--device', 'cpu']) == 0
    table = experiments.main(['score', str(run), '--picture', 'score.png', '--out', str(tmp_path)])
    rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| run')]
    assert len(rows) == 2 and rows[0].startswith(f'| {run} |') and rows[1].startswith('| floor of')
    assert all(float(v) >= 0 for v in rows[0].strip(' |').split(' | ')[1:])   # MMD and energy at 1 and 2 steps
    with Image.open(tmp_path / 'score.png') as picture:
        assert picture.size[0] > 3 * experiments.PANEL                          # data, 1 step, 2 steps


def test_score_takes_other_step_counts_and_the_restart_sampler_and_refuses_zero_steps(tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(experiments, 'EVAL_POINTS', 300)
    run = tmp_path / 'moons'
    assert train.main(['--dataset', 'moons', '--iters', '2', '--batch', '32', '--channels', '16', '--out', str(run),
                       '--sample-every', '0', '--device', 'cpu']) == 0
    rows = {}
    for flags in ([], ['--restart']):
        table = experiments.main(['score', str(run), '--steps', '1', '4', *flags, '--out', str(tmp_path)])
        header, _, rows[bool(flags)], floor = table.splitlines()[:4]
        assert header == '| run | MMD 1 step | MMD 4 steps | energy 1 step | energy 4 steps |'
        assert len(floor.split('|')) == len(header.split('|')) and floor.startswith('| floor of')
    one = [row.strip(' |').split(' | ')[1:] for row in (rows[False], rows[True])]
    assert one[0][0] == one[1][0] and one[0][1] != one[1][1]     # 1 step: the same sample; 4 steps: another sampler
    with pytest.raises(SystemExit):
        experiments.main(['score', str(run), '--steps', '0'])
