"""Images with one channel, end to end: FID repeats the grey channel to three, as the field does, and
docs/digits.py on a tiny budget prints its tables (a stand-in for the Inception network keeps it fast)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'docs'))

import fid  # noqa: E402


class Recorder(torch.nn.Module):
    """Stands in for InceptionFeatures: keeps every batch it sees, returns 4 features per image."""

    def __init__(self, weights=None):
        super().__init__()
        self.seen = []

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, list(images.shape)
        self.seen.append(images)
        x = images.float()
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0], x[:, 1, -1, -1]], 1)

    def features(self, images):  # the one pass of `fid.py ref`: the same 4 features stand in for every kind
        pool = self(images)
        return {'pool_3': pool, 'spatial': pool}


def grey_images(n=6, side=8, seed=0):
    return torch.randint(0, 256, (n, 1, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_one_channel_images_reach_the_inception_network_as_three_equal_channels():
    net, grey = Recorder(), grey_images()
    mu, sigma = fid.stats_of_batches(net, [grey[:4], grey[4:]], len(grey))
    seen = torch.cat(net.seen)
    assert seen.shape == (6, 3, 8, 8) and all(torch.equal(seen[:, c], grey[:, 0]) for c in range(3))
    assert np.allclose((mu, sigma)[0], fid.feature_stats(net(grey.expand(-1, 3, -1, -1)))[0])


def test_grey_npz_png_folder_and_dataset_give_the_same_reference_statistics(tmp_path, monkeypatch):
    grey = grey_images()
    np.savez(tmp_path / 'grey.npz', grey.permute(0, 2, 3, 1).numpy())          # [N, H, W, 1], as sample.py writes
    (tmp_path / 'pngs').mkdir()
    for i, image in enumerate(grey[:, 0].numpy()):
        Image.fromarray(image).save(tmp_path / 'pngs' / f'{i}.png')              # mode 'L'
    import data
    monkeypatch.setattr(fid, 'load_dataset', lambda name, data_dir: data.Dataset(name, 'image', grey, None, 0))
    monkeypatch.setattr(fid, 'InceptionFeatures', Recorder)
    stats = []
    for source in (tmp_path / 'grey.npz', tmp_path / 'pngs', 'some-grey-dataset'):
        out = tmp_path / f'ref{len(stats)}.npz'
        fid.main(['ref', '--dataset', str(source), '--out', str(out)])
        with np.load(out) as ref:
            stats.append((ref['mu'], ref['sigma']))
    for mu, sigma in stats[1:]:
        assert np.allclose(mu, stats[0][0]) and np.allclose(sigma, stats[0][1])


def test_the_digits_fid_table_on_a_tiny_budget(tmp_path, capsys, monkeypatch):
    pytest.importorskip('sklearn', reason="scikit-learn ships the digits: pip install scikit-learn")
    import digits
    monkeypatch.setattr(digits.fid, 'InceptionFeatures', Recorder)
    digits.main(['fid', '--rows', 'imm:1', 'fm:1', 'fm:2', '--iters', '2', '--work', str(tmp_path)])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| method')]
    assert [row.split('|')[1].strip() for row in rows] == ['IMM, M = 4', 'flow matching',
                                                           'floor: real half vs real half (899 vs 898)']
    assert all(len(row.split('|')) == 5 for row in rows)                         # a name and two step counts
    assert sorted(p.name for p in tmp_path.glob('*.npy')) == ['fm-1step-features.npy', 'fm-2step-features.npy',
                                                               'imm-1step-features.npy', 'real-features.npy']
    digits.main(['fid', '--rows', 'imm:1', '--iters', '2', '--work', str(tmp_path)])   # cached: nothing is redone
    progress = capsys.readouterr().err
    assert 'trained in' not in progress and 'images in' not in progress and 'FID' in progress


def test_the_digits_guidance_table_on_a_tiny_budget(tmp_path, capsys):
    pytest.importorskip('sklearn', reason="scikit-learn ships the digits: pip install scikit-learn")
    import digits
    digits.main(['guidance', '--iters', '2', '--work', str(tmp_path), '--flags', '--channels 16 --batch 16'])
    config = torch.load(tmp_path / 'cond' / 'ckpt.pt', map_location='cpu', weights_only=True)['net_config']
    assert config['model_channels'] == 16                                          # --flags reach the run
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')][1:]
    assert [row.split('|')[1].strip() for row in rows] == ['1.0', '1.5', '2.0', '3.0',
                                                           'real digits (5-fold held-out accuracy)']
    held_out = float(rows[-1].split('|')[2].strip('% '))
    assert held_out > 90                                                           # the classifier reads digits
