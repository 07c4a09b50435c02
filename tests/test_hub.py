"""Checkpoints by name on the Hugging Face Hub: `--ckpt hf://lumaai/imm/cifar10.pt` (sample.py) and
`--init-from hf://...` (train.py) go through huggingface_hub's cache, then through the same safe loader as a file.

Nothing is downloaded: each test lays out a cache folder in huggingface_hub's own layout (models--OWNER--REPO with
refs/main, blobs/ and snapshots/<commit>/ linking into them) and runs the scripts with HF_HUB_CACHE pointing at it
and HF_HUB_OFFLINE=1, so the real library resolves the name and a test can never reach the network.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

pytest.importorskip('huggingface_hub', reason='hf:// checkpoints need huggingface_hub: pip install huggingface_hub')

import checkpoint  # noqa: E402
from test_sample import MOONS, TINY_MLP, make_checkpoint  # noqa: E402

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def cache_with(cache, repo, files):
    """A Hugging Face cache holding {filename: bytes} of `repo` at COMMIT, laid out as huggingface_hub writes it:
    the content in blobs/<sha256>, snapshots/<commit>/<filename> a relative link to it, refs/main naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / 'refs').mkdir(parents=True)
    (folder / 'refs' / 'main').write_text(COMMIT)
    (folder / 'blobs').mkdir()
    (folder / 'snapshots' / COMMIT).mkdir(parents=True)
    for name, content in files.items():
        blob = hashlib.sha256(content).hexdigest()
        (folder / 'blobs' / blob).write_bytes(content)
        os.symlink(Path('..') / '..' / 'blobs' / blob, folder / 'snapshots' / COMMIT / name)
    return cache


def run(tmp_path, *argv):
    env = {**os.environ, 'HF_HUB_CACHE': str(tmp_path / 'hub'), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def released(tmp_path):
    """A checkpoint published in the cache as hf://lumaai/imm/cifar10.pt, and the same file on disk."""
    path = make_checkpoint(tmp_path / 'local' / 'cifar10.pt', TINY_MLP, MOONS)
    cache_with(tmp_path / 'hub', 'lumaai/imm', {'cifar10.pt': path.read_bytes()})
    return path


def test_sample_py_reads_a_hub_name_from_the_cache_as_it_reads_the_file(tmp_path, released):
    by_name = run(tmp_path, ROOT / 'sample.py', '--ckpt', 'hf://lumaai/imm/cifar10.pt', '--num-samples', 5,
                  '--out', tmp_path / 'by_name.npz', '--device', 'cpu')
    assert by_name.returncode == 0, by_name.stderr
    by_file = run(tmp_path, ROOT / 'sample.py', '--ckpt', released, '--num-samples', 5,
                  '--out', tmp_path / 'by_file.npz', '--device', 'cpu')
    assert by_file.returncode == 0, by_file.stderr
    assert np.array_equal(np.load(tmp_path / 'by_name.npz')['arr_0'], np.load(tmp_path / 'by_file.npz')['arr_0'])
    assert f'snapshots/{COMMIT}/cifar10.pt' in by_name.stdout    # the cached copy is what was read


def test_train_py_starts_from_a_hub_name(tmp_path, released):
    r = run(tmp_path, ROOT / 'train.py', '--dataset', 'moons', '--init-from', 'hf://lumaai/imm/cifar10.pt',
            '--iters', 1, '--batch', 8, '--lr', 1e-30, '--sample-every', 0, '--out', tmp_path / 'run', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    trained = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['net']
    ema = torch.load(released, weights_only=True)['ema']
    assert all(torch.allclose(trained[k], ema[k]) for k in ema)   # their EMA weights, moved by a 1e-30 step


@pytest.mark.parametrize('name, says', [
    ('hf://lumaai/imm/imagenet256_ts_a2.pkl', ["'imagenet256_ts_a2.pkl'", 'lumaai/imm', 'LocalEntryNotFoundError']),
    ('hf://lumaai/imm', ['expected hf://OWNER/REPO/FILE', 'hf://lumaai/imm/cifar10.pt']),
])
def test_a_name_the_cache_cannot_give_offline_is_one_clear_line(tmp_path, released, name, says):
    r = run(tmp_path, ROOT / 'sample.py', '--ckpt', name, '--device', 'cpu')
    assert r.returncode == 2 and r.stderr.startswith(f'error: {name}') and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and all(s in r.stderr for s in says), r.stderr


def test_without_huggingface_hub_the_error_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)    # as if not installed: the import fails
    with pytest.raises(checkpoint.UsageError, match='pip install huggingface_hub'):
        checkpoint.file_of('hf://lumaai/imm/cifar10.pt')
