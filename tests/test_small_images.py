"""docs/small_images.py: the suite of small image sets is written as arrays train.py reads, and a stage of the sweep
on a tiny budget trains, scores and tabulates every cell once (a stand-in for the Inception network keeps it fast)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'docs'))
sys.path.insert(0, str(ROOT / 'tests'))

from data import load_dataset  # noqa: E402
from test_digits import Recorder  # noqa: E402

pytest.importorskip('sklearn', reason="the sets are made of what scikit-learn ships: pip install scikit-learn")
import small_images  # noqa: E402


def test_the_sets_are_arrays_train_py_reads_with_their_shapes_and_labels(tmp_path):
    small_images.main(['sets', '--data', str(tmp_path), '--work', str(tmp_path / 'work')])
    shapes = {}
    for name in small_images.SETS:
        data = load_dataset(small_images.dataset_of(name, str(tmp_path)))
        shapes[name] = list(data.x.shape[1:])
        assert data.kind == 'image' and data.num_classes in (2, 10) and len(data.x) <= 2000
    assert shapes == {'digits': [1, 8, 8], 'digits-colour': [3, 8, 8], 'digits-inverted-16': [1, 16, 16],
                      'digits-texture-16': [3, 16, 16], 'patches-8': [3, 8, 8], 'patches-16': [3, 16, 16]}
    again = tmp_path / 'again'
    small_images.main(['sets', '--data', str(again), '--work', str(tmp_path / 'work')])
    for name in small_images.SETS:                           # the same images every time
        path = small_images.dataset_of(name, str(tmp_path))
        if path.endswith('.npz'):
            assert np.array_equal(np.load(path)['x'], np.load(small_images.dataset_of(name, str(again)))['x'])


def test_a_stage_on_a_tiny_budget_scores_each_cell_once_and_tabulates_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(small_images.digits.fid, 'InceptionFeatures', Recorder)
    monkeypatch.setattr(small_images, 'cpu_per_step', lambda dataset, flags: 0.02 if '16' in flags else 0.01)
    monkeypatch.setattr(small_images, 'BUDGET_S', 0.2)                      # 20 steps of 'base', 10 of 'ch16'
    monkeypatch.setattr(small_images, 'N_SAMPLES', 20)
    tiny = small_images.vary(small_images.TODAY, batch=8, channels=8)
    monkeypatch.setitem(small_images.CONFIGS, 'base', tiny)
    monkeypatch.setitem(small_images.CONFIGS, 'ch16', small_images.vary(tiny, channels=16))
    monkeypatch.setitem(small_images.CONFIGS, 'fixed', small_images.TODAY + ['--iters', '3'])
    monkeypatch.setitem(small_images.STAGES, 'tiny', (['digits'], ['base', 'ch16'], (1, 2)))
    monkeypatch.setitem(small_images.STAGES, 'last', (['digits'], ['fixed'], (1, 2, 4)))
    work = ['--data', str(tmp_path), '--work', str(tmp_path / 'work')]
    for stage in ('tiny', 'last'):
        small_images.main(['sweep', '--stage', stage, *work])
    cells = small_images.Cells(str(tmp_path / 'work')).all
    assert cells['digits|fixed']['iters'] == 3 and {'fid1', 'fid2', 'fid4', 'train_s'} <= set(cells['digits|fixed'])
    assert (cells['digits|base']['iters'], cells['digits|ch16']['iters']) == (20, 10)
    assert 'fid4' not in cells['digits|base']
    capsys.readouterr()
    small_images.main(['sweep', '--stage', 'tiny', *work])                   # done: nothing is trained or scored
    out, progress = capsys.readouterr()
    assert 'trained in' not in progress and 'images in' not in progress
    table = [line for line in out.splitlines() if line.startswith('| ')]
    assert table[0] == "| config | digits | 1-step FID / base's, mean (sets) |"
    assert [row.split('|')[1].strip() for row in table[1:]] == ['base', 'ch16', 'floor']
    ratio = cells['digits|ch16']['fid1'] / cells['digits|base']['fid1']
    assert table[1].endswith('| 1.000 (1) |') and table[2].endswith(f'| {ratio:.3f} (1) |')
    monkeypatch.setattr(small_images, 'SETS', {'digits': small_images.SETS['digits']})
    small_images.main(['picture', '--config', 'ch16', '--out', str(tmp_path / 'p.png'), *work])
    picture = np.asarray(Image.open(tmp_path / 'p.png'))
    assert picture.shape == (16 + 32, 130 + 3 * (8 * 34 - 2) + 2 * 8, 3)   # title, one row of 3 x 8 tiles of 32
    assert picture[16:, 130:130 + 30].std() > 0                              # the real digits are drawn


def test_two_sweeps_at_once_keep_each_others_results(tmp_path):
    first, second = small_images.Cells(str(tmp_path)), small_images.Cells(str(tmp_path))
    first.get('digits', 'base')['fid1'] = 1.0
    first.step_s('8px')['base'] = 0.1
    first.save()
    second.get('patches-8', 'base')['fid1'] = 2.0
    second.step_s('8px')['ch16'] = 0.05
    second.save()                                   # written after the first, without reading its results itself
    first.get('digits', 'base')['fid2'] = 3.0
    first.save()
    assert small_images.Cells(str(tmp_path)).all == {'digits|base': {'fid1': 1.0, 'fid2': 3.0},
                                                      'patches-8|base': {'fid1': 2.0},
                                                      'step_s': {'8px': {'base': 0.1, 'ch16': 0.05}}}
