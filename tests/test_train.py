"""train.py as a specification: what a run writes, that resuming is exact, that ranks and micro-batches only
split the work, and that bad input ends in one clear message with nothing damaged.

Runs are tiny (a 32-wide MLP on a 2-D toy, a few steps on the CPU); most call train.main() in this process,
a few run the script as a user or a cluster would (Ctrl-C, SIGTERM and a requeue, torchrun, the error line, a disk
that fills up).
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import checkpoint  # noqa: E402
import train  # noqa: E402
import settings as run_settings  # noqa: E402
from data import Dataset, encode, load_dataset  # noqa: E402
from util import UsageError  # noqa: E402
from imm import IMMConfig  # noqa: E402
from model import build_net  # noqa: E402


def toy(out, *extra, iters=6):
    """Flags of a tiny 2-D run writing into `out`."""
    return ['--dataset', 'moons', '--iters', str(iters), '--batch', '32', '--channels', '32', '--out', str(out),
            '--log-every', '2', '--ckpt-every', '3', '--sample-every', '0', '--device', 'cpu', *map(str, extra)]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def run_script(*args, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_toy_run_writes_checkpoint_log_and_pictures(tmp_path):
    assert train.main(toy(tmp_path, '--sample-every', '3')) == 0
    ckpt = load(tmp_path / 'ckpt.pt')
    assert set(checkpoint.KEYS) <= set(ckpt) and ckpt['step'] == 6 and ckpt['scaler'] is None
    assert ckpt['args']['dataset'] == 'moons' and ckpt['args']['iters'] == 6 and json.dumps(ckpt['args'])
    assert ckpt['data'] == {'name': 'moons', 'kind': 'vector', 'shape': [2], 'num_classes': 2,
                            'mean': ckpt['data']['mean'], 'std': ckpt['data']['std']}
    assert len(ckpt['data']['mean']) == 2
    assert IMMConfig(**ckpt['imm_config']) == IMMConfig(k=10, param='euler_fm', eps=0.0)
    net = build_net(ckpt['net_config'])            # what sample.py does
    net.load_state_dict(ckpt['ema'])
    net.load_state_dict(ckpt['net'])
    assert ckpt['net_config']['hidden'] == 32 and ckpt['net_config']['num_classes'] == 0
    log = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [e['step'] for e in log] == [2, 4, 6]
    assert {'loss', 'img_per_s', 'sec_per_step', 'eta_s'} <= set(log[0]) and all(np.isfinite(e['loss']) for e in log)
    assert sorted(os.listdir(tmp_path / 'samples')) == [f'000000{i}-{s}.png' for i in (3, 6)
                                                          for s in ('1and2step', '1step', '2step')]
    assert (tmp_path / 'data.png').exists() and not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    flags = ['--dropout', '0.1', '--cond']                 # dropout masks and label dropout must replay too
    assert train.main(toy(tmp_path / 'straight', *flags, iters=8)) == 0
    assert train.main(toy(tmp_path / 'resumed', *flags, iters=5)) == 0
    assert train.main(toy(tmp_path / 'resumed', *flags, '--resume', iters=8)) == 0
    a, b = load(tmp_path / 'straight' / 'ckpt.pt'), load(tmp_path / 'resumed' / 'ckpt.pt')
    assert a['step'] == b['step'] == 8
    for key in ('net', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name}'
    for i, state in a['opt']['state'].items():
        for name, value in state.items():
            assert torch.equal(value, b['opt']['state'][i][name]), f'opt.{i}.{name}'
    # the log of the resumed run reads like the uninterrupted one
    steps = [json.loads(line)['step'] for line in (tmp_path / 'resumed' / 'log.jsonl').read_text().splitlines()]
    assert steps == [2, 4, 5, 6, 8]


def test_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path):
    train.main(toy(tmp_path / 'whole', iters=2))
    train.main(toy(tmp_path / 'micro', '--micro-batch', '8', iters=2))
    a, b = load(tmp_path / 'whole' / 'ckpt.pt')['net'], load(tmp_path / 'micro' / 'ckpt.pt')['net']
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_batch_is_drawn_from_shuffled_epochs_fixed_by_seed_and_step():
    n, batch = 10, 4
    stream = torch.cat([train.batch_rows(step, batch, n, 0, torch.device('cpu')) for step in range(5)])
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:20].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])        # a new order every epoch
    assert torch.equal(train.batch_rows(3, batch, n, 0, torch.device('cpu')), stream[12:16])
    assert not torch.equal(train.batch_rows(3, batch, n, 1, torch.device('cpu')), stream[12:16])


def test_an_image_run_with_labels_in_bf16(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / 'images.npz', x=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(16) % 2)
    out = tmp_path / 'run'
    args = ['--dataset', tmp_path / 'images.npz', '--model', 'tiny', '--iters', 2, '--batch', 8, '--cond',
            '--precision', 'bf16', '--out', out, '--sample-every', 2, '--device', 'cpu']
    assert train.main(list(map(str, args))) == 0
    ckpt = load(out / 'ckpt.pt')
    assert ckpt['net_config']['arch'] == 'unet' and ckpt['net_config']['img_resolution'] == 8
    assert ckpt['net_config']['num_classes'] == 2 and ckpt['data']['shape'] == [3, 8, 8]
    assert (out / 'samples' / '0000002-2step.png').exists()


def test_fid_is_logged_and_the_best_checkpoint_kept(tmp_path, monkeypatch):
    import fid
    seen, scores = [], iter([5.0, 4.0, 3.0, 6.0])               # 1-step, 2-step at step 2, then at step 4

    def fake_fid(generate, n, ref, net=None):
        images = generate(3)
        seen.append((images.dtype, tuple(images.shape), n))
        return next(scores)
    monkeypatch.setattr(fid, 'InceptionFeatures', lambda weights=None: torch.nn.Identity())
    monkeypatch.setattr(fid, 'fid_of_sampler', fake_fid)
    np.save(tmp_path / 'images.npy', np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(4), sigma=np.eye(4))
    out = tmp_path / 'run'
    args = ['--dataset', tmp_path / 'images.npy', '--model', 'tiny', '--iters', 4, '--batch', 8, '--out', out,
            '--fid-every', 2, '--fid-n', 20, '--fid-ref', tmp_path / 'ref.npz', '--sample-every', 0, '--device', 'cpu']
    assert train.main(list(map(str, args))) == 0
    assert seen == [(torch.uint8, (3, 3, 8, 8), 20)] * 4
    fids = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines() if 'fid_2step' in line]
    assert [(e['step'], e['fid_1step'], e['fid_2step']) for e in fids] == [(2, 5.0, 4.0), (4, 3.0, 6.0)]
    best = load(out / 'ckpt-best.pt')
    assert best['step'] == 2 and best['best_fid'] == 4.0 and load(out / 'ckpt.pt')['best_fid'] == 4.0


def test_fp16_keeps_its_grad_scaler_and_fm_loss_trains(tmp_path):
    assert train.main(toy(tmp_path / 'fp16', '--precision', 'fp16', iters=2)) == 0
    assert load(tmp_path / 'fp16' / 'ckpt.pt')['scaler']['scale'] > 0
    assert train.main(toy(tmp_path / 'fm', '--loss', 'fm', iters=2)) == 0
    assert load(tmp_path / 'fm' / 'ckpt.pt')['args']['loss'] == 'fm'


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = []
    real_loss = train.imm_loss

    def loss_that_explodes_at_step_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float('nan') if len(calls) == 5 else loss
    monkeypatch.setattr(train, 'imm_loss', loss_that_explodes_at_step_5)
    assert train.main(toy(tmp_path, iters=10)) == 1
    err = capsys.readouterr().err
    assert 'non-finite at step 5' in err and 'step 3' in err
    assert load(tmp_path / 'ckpt.pt')['step'] == 3           # written at step 3, not at the bad step 6


def test_a_failing_torch_compile_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, capsys):
    def broken_compile(net, **kwargs):
        def call(*args, **kwargs):
            raise RuntimeError('no C++ compiler found')
        return call
    monkeypatch.setattr(torch, 'compile', broken_compile)
    assert train.main(toy(tmp_path, '--compile', iters=2)) == 0
    assert 'warning: torch.compile failed (RuntimeError: no C++ compiler found); training without it' in capsys.readouterr().err


def test_bench_prints_one_json_line(capsys):
    assert train.main(['--dataset', 'moons', '--bench', '2', '--batch', '32', '--channels', '32', '--device', 'cpu']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {'img_per_s', 'step_s', 'peak_mem_gb', 'tflops', 'mfu', 'fwd_gflops_per_sample'} <= set(result)
    assert result['mfu'] is None and result['fwd_gflops_per_sample'] > 0


# ---- bad input: one message naming the value and what is accepted; nothing written is damaged

@pytest.mark.parametrize('flags, message', [
    (['--dataset', 'svhn'], "unknown dataset 'svhn'"),
    (['--dataset', 'missing.npy'], "'missing.npy' does not exist"),
    (['--batch', '30'], '--batch 30 must be divisible by M x ranks = 4 x 1'),
    (['--micro-batch', '12'], '--micro-batch 12: accepted'),
    (['--particles', '0'], '--particles 0 is not valid; accepted: an integer >= 1'),
    (['--param', 'euler_fm', '--schedule', 'cosine'], "--param 'euler_fm' is not valid; accepted: 'euler_fm' only with"),
    (['--ema', '1.5'], '--ema 1.5: accepted a number in [0, 1)'),
    (['--model', 'tiny'], 'U-Net for images'),
    (['--cond', '--dataset', 'flat.npy'], 'has no labels'),
    (['--iters', '-1'], '--iters -1'),
    (['--dataset', 'seven.npy'], "'seven.npy' holds images of side 7: pass --resolution 6 or 8"),
    (['--channels', '5'], '--channels 5: the MLP of --model mlp needs an even number >= 4'),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / 'flat.npy', np.zeros((8, 2), np.float32) + np.arange(2))
    np.save(tmp_path / 'seven.npy', np.zeros((8, 7, 7, 3), np.uint8))        # 7x7: the small U-Net halves 7
    with pytest.raises(UsageError, match=re.escape(message)):
        train.main(toy(tmp_path / 'run') + flags)
    assert not (tmp_path / 'run').exists()


def test_wrong_arrays_are_refused(tmp_path):
    np.save(tmp_path / 'bad.npy', np.zeros((8, 4, 4), np.float64))
    with pytest.raises(UsageError, match=r'float64 \[8, 4, 4\]; expected'):
        train.main(toy(tmp_path / 'run') + ['--dataset', str(tmp_path / 'bad.npy')])


def test_a_checkpoint_of_another_config_or_a_corrupt_one_is_refused_untouched(tmp_path):
    out = tmp_path / 'run'
    train.main(toy(out, iters=3))
    before = {p: p.read_bytes() for p in [out / 'ckpt.pt', out / 'log.jsonl']}
    with pytest.raises(UsageError, match=r"net_config\.hidden: checkpoint 32, flags 64.*imm_config\.k"):
        train.main(toy(out, '--resume', '--channels', '64', '--k', '12'))
    with pytest.raises(UsageError, match='already holds a run.*--resume'):
        train.main(toy(out))                                   # a new run would overwrite it
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'\x00' * 100)
    with pytest.raises(UsageError, match="cannot read checkpoint .*corrupt.pt"):
        train.main(toy(out, '--resume', corrupt))
    with pytest.raises(UsageError, match="missing.pt: no such file"):     # a file named must exist
        train.main(toy(tmp_path / 'elsewhere', '--resume', tmp_path / 'missing.pt'))
    with pytest.raises(UsageError, match="--init-from .* and --resume: give one"):
        train.main(toy(out, '--resume', '--init-from', out / 'ckpt.pt'))
    assert all(p.read_bytes() == b for p, b in before.items()) and corrupt.read_bytes() == b'\x00' * 100


def test_the_script_prints_one_error_line_without_traceback(tmp_path):
    result = run_script('train.py', *toy(tmp_path / 'run'), '--dataset', 'nope')
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.startswith("error: unknown dataset 'nope'") and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_writes_a_checkpoint_at_the_current_step(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, 'train.py', *toy(tmp_path, iters=100_000), '--log-every', '1'],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                                   # wait until training runs
        if line.startswith('step 2/'):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = load(tmp_path / 'ckpt.pt')['step']
    assert 2 <= step < 100_000 and f'wrote {tmp_path}' in out and 'Traceback' not in err


def test_torchrun_with_two_ranks_matches_one_process(tmp_path):
    flags = ['--iters', '3', '--log-every', '1', '--ckpt-every', '3', '--sample-every', '0']
    one = run_script('train.py', *toy(tmp_path / 'one'), *flags)
    assert one.returncode == 0, one.stderr
    two = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                     *toy(tmp_path / 'two'), *flags)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('step 3/3') == 1                   # only rank 0 talks
    a, b = load(tmp_path / 'one' / 'ckpt.pt'), load(tmp_path / 'two' / 'ckpt.pt')
    # the same global batch, times and noise, split in halves: equal up to float summation order
    assert all(torch.allclose(a['net'][k], b['net'][k], atol=1e-5) for k in a['net'])
    loss = [[json.loads(line)['loss'] for line in (tmp_path / run / 'log.jsonl').read_text().splitlines()]
            for run in ('one', 'two')]
    assert np.allclose(loss[0], loss[1], rtol=1e-4)


# ---- the pure pieces of train.py: settings and the batch draw, no training run

def settings(data, *flags, world=1):
    return run_settings.resolve(run_settings.parse_args(['--dataset', data.name, *map(str, flags)]), data, world)


def plain_defaults(kind):
    """The settings table's values for a kind, less those that follow another setting (eps, T, augment, cond)."""
    return {k: v for k, v in run_settings.defaults(kind).items() if not isinstance(v, run_settings.Follows)}


def image_data(n=12, num_classes=3, side=4, name='images'):
    images = torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Dataset(name, 'image', images, torch.arange(n) % num_classes, num_classes)


def test_settings_fill_the_data_kinds_defaults_and_keep_the_flags_given():
    vectors = load_dataset('moons')
    args, cfg, net_config, M, micro = settings(vectors, '--lr', '0.01')
    assert (args.iters, args.batch, args.lr, args.model, args.out) == (6000, 512, 0.01, 'mlp', os.path.join('runs', 'moons'))
    assert cfg == IMMConfig(k=10, param='euler_fm', eps=0.0) and M == 4 and micro == 'auto'   # toys: docs/experiments.md
    assert net_config['dim'] == 2 and net_config['hidden'] == 64
    assert settings(vectors, '--k', '15')[1].k == 15                     # a k given is kept
    args, cfg, net_config, M, micro = settings(image_data(side=32), '--cond', '--micro-batch', '8', '--model', 'tiny')
    assert (args.iters, args.batch, args.ema, args.lr) == (400_000, 4096, 0.9999, 1e-4)
    assert cfg == IMMConfig()                                              # the paper's k = 15 for images
    assert net_config['arch'] == 'unet' and net_config['img_resolution'] == 32 and net_config['num_classes'] == 3
    assert micro == 8


@pytest.mark.parametrize('side, name', [(4, 'images'), (8, 'digits'), (16, 'my_icons.npz')])
def test_small_images_of_any_source_pick_the_small_image_defaults(side, name):
    args, _, net_config, _, _ = settings(image_data(side=side, name=name))
    small = plain_defaults('small image')
    assert {key: getattr(args, key) for key in small} == small and args.model == 'small' and not args.xflip
    assert net_config['arch'] == 'unet' and net_config['img_resolution'] == side and net_config['in_channels'] == 3
    args, *_ = settings(image_data(side=side, name=name), '--iters', '7', '--xflip')   # flags still win
    assert args.iters == 7 and args.xflip


@pytest.mark.parametrize('side, name', [(32, 'images'), (20, 'images'), (32, 'cifar10'), (16, 'cifar10')])
def test_cifar10_and_larger_images_keep_the_papers_settings(side, name):
    args, *_ = settings(image_data(side=side, name=name))
    image = plain_defaults('image')
    assert {key: getattr(args, key) for key in image} == image and args.model == 'ddpmpp' and args.xflip


def test_a_run_prints_its_resolved_settings_first_and_marks_the_flags_given(tmp_path, capsys):
    assert train.main(toy(tmp_path / 'run', '--lr', '0.01', iters=2)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('settings (vector column of settings.TABLE')
    rows = {line.split()[0]: line.split() for line in out[1:1 + len(run_settings.TABLE)]}
    assert list(rows) == [name for name, *_ in run_settings.TABLE]
    assert rows['lr'][1:3] == ['*', '0.01'] and rows['k'][1] == '10' and rows['eps'][1] == '0.0'
    assert load(tmp_path / 'run' / 'ckpt.pt')['args']['k'] == 10          # stored in the checkpoint as resolved


def test_settings_do_not_change_the_parsed_flags():
    parsed = run_settings.parse_args(['--dataset', 'moons'])
    before = dict(vars(parsed))
    run_settings.resolve(parsed, load_dataset('moons'), 1)
    assert vars(parsed) == before


def test_flow_matching_is_the_m_equals_1_case_of_the_batch_layout():
    args, cfg, _, M, _ = settings(load_dataset('moons'), '--loss', 'fm', '--batch', '6', '--micro-batch', '3')
    assert M == 1 and cfg.particles == 4                     # any batch size: every row is its own group


def test_bench_is_a_configuration_that_writes_nothing():
    args, *_ = settings(load_dataset('moons'), '--bench', '5', '--resume', '--out', 'somewhere')
    assert args.out is None and args.resume is None and args.iters == run_settings.BENCH_WARMUP + 5
    assert (args.log_every, args.ckpt_every, args.sample_every, args.fid_every) == (0, 0, 0, 0)


def test_draw_batch_gives_each_group_one_time_pair_and_images_in_the_network_range():
    data = image_data()
    args, cfg, _, M, _ = settings(data, '--batch', '8', '--cond', '--label-dropout', '0.5')
    x, noise, t, s, labels, augment_labels = train.draw_batch(0, data, args, cfg, M)
    assert x.shape == noise.shape == (8, 3, 4, 4) and t.shape == s.shape == (2,) and labels.shape == (8,)
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and (s < t).all()
    assert set(labels.tolist()) <= {0, 1, 2, 3}              # 3 = the null class of label dropout
    rows = train.batch_rows(0, 8, len(data.x), args.seed, torch.device('cpu'))
    plain = encode(data.x[rows])                             # every image is itself or its mirror image
    assert all(torch.equal(x[i], plain[i]) or torch.equal(x[i], plain[i].flip(2)) for i in range(8))
    again = train.draw_batch(0, data, args, cfg, M)
    assert all(torch.equal(a, b) for a, b in zip((x, noise, t, s, labels), again))
    other = train.draw_batch(1, data, args, cfg, M)
    assert not torch.equal(noise, other[1]) and not torch.equal(t, other[2])


@pytest.mark.parametrize('augment', ['0', '0.5'])
def test_draw_batch_on_two_ranks_splits_the_one_rank_batch(augment):
    data = image_data()
    args, cfg, _, M, _ = settings(data, '--batch', '8', '--cond', '--augment', augment)
    whole = train.draw_batch(3, data, args, cfg, M)
    halves = [train.draw_batch(3, data, args, cfg, M, rank, world=2) for rank in (0, 1)]
    assert (whole[-1] is None) == (augment == '0')           # augmentation labels only with --augment > 0
    for a, b0, b1 in zip(whole, *halves):
        assert (a is None and b0 is None and b1 is None) or torch.equal(a, torch.cat([b0, b1]))


def test_augmentation_is_edms_on_cifar10_and_off_elsewhere():
    cifar = Dataset('cifar10', 'image', image_data().x, image_data().labels, 3)
    args, _, net_config, *_ = settings(cifar, '--model', 'tiny')
    assert args.augment == 0.12 and net_config['augment_dim'] == 9
    args, _, net_config, *_ = settings(image_data(), '--model', 'tiny')
    assert args.augment == 0 and net_config['augment_dim'] == 0
    args, cfg, _, M, _ = settings(cifar, '--batch', '8')
    augment_labels = train.draw_batch(0, cifar, args, cfg, M)[-1]
    assert augment_labels.shape == (8, 9) and (augment_labels[:, 0] == 1).any()   # x-flip is labelled now
    with pytest.raises(UsageError, match='--augment 0.5: accepted a probability in \\[0, 1\\] for images, 0 for vectors'):
        settings(load_dataset('moons'), '--augment', '0.5')


def test_a_new_run_can_start_from_the_ema_of_another(tmp_path):
    train.main(toy(tmp_path / 'first', iters=3))
    first = load(tmp_path / 'first' / 'ckpt.pt')
    assert train.main(toy(tmp_path / 'second', '--init-from', tmp_path / 'first', '--lr', '1e-30', iters=1)) == 0
    second = load(tmp_path / 'second' / 'ckpt.pt')
    assert second['step'] == 1 and second['net_config'] == first['net_config']
    assert all(torch.allclose(second['net'][k], v, atol=1e-6) for k, v in first['ema'].items())
    assert not all(torch.allclose(first['ema'][k], v, atol=1e-6) for k, v in first['net'].items())  # EMA, not net


def test_a_few_steps_on_the_digits_train_the_small_unet_and_save_a_checkpoint(tmp_path):
    pytest.importorskip('sklearn', reason="scikit-learn ships the digits: pip install scikit-learn")
    flags = ['--dataset', 'digits', '--iters', '2', '--batch', '16', '--channels', '16', '--out', tmp_path,
             '--log-every', '1', '--sample-every', '2', '--device', 'cpu', '--cond']
    assert train.main(list(map(str, flags))) == 0
    ckpt = load(tmp_path / 'ckpt.pt')
    assert ckpt['step'] == 2 and ckpt['data']['shape'] == [1, 8, 8] and ckpt['data']['num_classes'] == 10
    assert ckpt['net_config']['arch'] == 'unet' and ckpt['net_config']['img_resolution'] == 8
    assert ckpt['net_config']['in_channels'] == 1 and ckpt['net_config']['num_classes'] == 10
    assert ckpt['args']['model'] == 'small' and ckpt['args']['xflip'] is False
    assert sorted(os.listdir(tmp_path / 'samples')) == ['0000002-1and2step.png', '0000002-1step.png',
                                                          '0000002-2step.png']


# ---- what a cluster does to a run: signals, requeues, full disks

def same_run(a, b, where='ckpt'):
    """Assert that two checkpoints hold equal values, every tensor bitwise (torch.equal), the output folder aside."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if where != "ckpt['args']" or k != 'out':
                same_run(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            same_run(u, v, f'{where}[{i}]')
    else:
        assert a == b, where


def start_script(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f'no line starting with {prefix!r}; stderr: {proc.stderr.read()}')


def test_a_requeued_run_reruns_the_same_command_and_ends_as_one_uninterrupted_run(tmp_path):
    command = ['train.py', *toy(tmp_path / 'requeued', '--dropout', '0.1', '--cond', '--resume', '--log-every', 1,
                                iters=100)]                    # steps enough that the signal lands mid-run
    first = start_script(*command)
    assert wait_for_line(first, '--resume: no checkpoint at').endswith('yet; starting a new run\n')
    wait_for_line(first, 'step 3/')
    first.send_signal(signal.SIGTERM)                          # SLURM's signal, and torchrun's forwarded copy:
    first.send_signal(signal.SIGTERM)                          # the second must not kill the run
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and 'Traceback' not in err, err
    stopped_at = load(tmp_path / 'requeued' / 'ckpt.pt')['step']
    assert 3 <= stopped_at < 100 and f'(step {stopped_at}); continue with the same command' in out
    again = run_script(*command)                               # the requeued job: the identical command
    assert again.returncode == 0 and f'steps {stopped_at}->100' in again.stdout, again.stderr
    assert train.main(toy(tmp_path / 'straight', '--dropout', '0.1', '--cond', '--resume', '--log-every', 1,
                          iters=100)) == 0
    same_run(load(tmp_path / 'straight' / 'ckpt.pt'), load(tmp_path / 'requeued' / 'ckpt.pt'))
    steps = [e['step'] for e in checkpoint.read_log(tmp_path / 'requeued' / 'log.jsonl')]
    assert steps == list(range(1, 101))                         # the log and loss.png show the whole run
    assert (tmp_path / 'requeued' / 'loss.png').exists()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_rank_0_saves(tmp_path):
    agent = start_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                         *toy(tmp_path, '--log-every', 1, iters=100_000))
    wait_for_line(agent, 'step 2/')
    workers = [int(pid) for pid in os.listdir('/proc') if pid.isdigit()
               and Path(f'/proc/{pid}/stat').exists() and open(f'/proc/{pid}/stat').read().split(')')[-1].split()[1]
               == str(agent.pid)]
    rank_1 = [pid for pid in workers if b'RANK=1' in Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')]
    assert len(rank_1) == 1, workers
    os.kill(rank_1[0], signal.SIGTERM)                         # rank 0 is not signalled
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0 and 'Traceback' not in err, err
    stopped_at = int(re.search(r'stopped by signal 15 at step (\d+)', out)[1])
    assert load(tmp_path / 'ckpt.pt')['step'] == stopped_at and f'(step {stopped_at})' in out


def test_a_checkpoint_over_the_file_size_limit_ends_the_run_in_one_line_and_keeps_the_last(tmp_path):
    import resource
    assert train.main(toy(tmp_path, iters=3)) == 0
    before = (tmp_path / 'ckpt.pt').read_bytes()
    limit = len(before) // 2                                   # the log and loss.png fit, a checkpoint does not
    result = subprocess.run([sys.executable, 'train.py', *toy(tmp_path, '--resume', iters=6)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot write {tmp_path / 'ckpt.pt'} at step 6: File too large [EFBIG]. "
                                    f"{tmp_path / 'ckpt.pt'} (step 3) is intact, and nothing half-written is left.")
    assert (tmp_path / 'ckpt.pt').read_bytes() == before and not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_a_temporary_checkpoint_left_by_a_killed_run_is_removed_at_the_next_start(tmp_path):
    assert train.main(toy(tmp_path, iters=3)) == 0
    (tmp_path / 'ckpt.tmp12345.pt').write_bytes(b'half a checkpoint')      # SIGKILL while writing
    assert train.main(toy(tmp_path, '--resume', iters=4)) == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('ckpt')) == ['ckpt.pt']


def in_new_mount_namespace(script):
    """Run a shell script as root of a new user and mount namespace (where it may mount a tmpfs); skip where this
    machine does not allow one."""
    if subprocess.run(['unshare', '-rm', 'true'], capture_output=True).returncode != 0:
        pytest.skip('unshare -rm (a user and mount namespace) is not allowed here: cannot mount a small tmpfs')
    return subprocess.run(['unshare', '-rm', 'sh', '-c', script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    disk, kept = tmp_path / 'disk', tmp_path / 'kept'
    disk.mkdir()
    train_cmd = ' '.join([sys.executable, 'train.py', *map(str, toy(disk / 'run', iters=6))])
    result = in_new_mount_namespace(f'mount -t tmpfs -o size=800k tmpfs {disk} && {train_cmd}; '
                                    f'echo "exit $?" >&2; cp -r {disk / "run"} {kept}')   # one checkpoint fits, not two
    err = result.stderr.splitlines()
    assert err[-1] == 'exit 1' and len(err) == 2, result.stderr
    assert err[0].startswith(f"error: cannot write {disk / 'run' / 'ckpt.pt'} at step 6: No space left on device "
                             f"[ENOSPC]. {disk / 'run' / 'ckpt.pt'} (step 3) is intact")
    assert load(kept / 'ckpt.pt')['step'] == 3 and not [f for f in os.listdir(kept) if '.tmp' in f]


@pytest.mark.slow
def test_an_output_folder_on_a_read_only_file_system_is_refused_in_one_line(tmp_path):
    disk = tmp_path / 'disk'
    disk.mkdir()
    run = ' '.join([sys.executable, 'train.py', *map(str, toy(disk / 'run', '--resume', iters=3))])
    result = in_new_mount_namespace(f'mount -t tmpfs tmpfs {disk} && {run} >/dev/null && '
                                    f'mount -o remount,ro {disk} && {run}')
    assert result.returncode == 2 and result.stderr == \
        f"error: --out {disk / 'run'}: cannot write there (Read-only file system [EROFS])\n"


def test_a_picture_that_cannot_be_written_warns_and_training_goes_on(tmp_path, capsys):
    (tmp_path / 'samples' / '0000003-1step.png').mkdir(parents=True)   # something in the way of the files
    (tmp_path / 'loss.png').mkdir()
    assert train.main(toy(tmp_path, '--sample-every', 3, iters=6)) == 0
    err = capsys.readouterr().err
    assert f"warning: cannot write {tmp_path / 'loss.png'} (Is a directory [EISDIR]); training goes on" in err
    assert f"warning: cannot write {tmp_path / 'samples' / '0000003-1step.png'} (Is a directory" in err
    assert load(tmp_path / 'ckpt.pt')['step'] == 6 and (tmp_path / 'samples' / '0000006-2step.png').exists()


def test_a_log_line_cut_short_is_left_out_when_the_log_is_read(tmp_path):
    (tmp_path / 'log.jsonl').write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert checkpoint.trim_log(tmp_path / 'log.jsonl', 2) == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.4}]
    assert checkpoint.read_log(tmp_path / 'log.jsonl') == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.4}]


def test_grad_checkpoint_may_change_when_a_run_resumes_and_is_refused_for_the_mlp(tmp_path):
    np.savez(tmp_path / 'images.npz', x=np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    flags = ['--dataset', tmp_path / 'images.npz', '--model', 'tiny', '--batch', 8, '--dropout', 0.2,
             '--sample-every', 0, '--ckpt-every', 2, '--device', 'cpu']
    assert train.main(list(map(str, flags + ['--out', tmp_path / 'plain', '--iters', 4]))) == 0
    assert train.main(list(map(str, flags + ['--out', tmp_path / 'switched', '--iters', 2, '--grad-checkpoint']))) == 0
    assert train.main(list(map(str, flags + ['--out', tmp_path / 'switched', '--iters', 4, '--resume']))) == 0
    same_run(load(tmp_path / 'plain' / 'ckpt.pt')['net'], load(tmp_path / 'switched' / 'ckpt.pt')['net'])
    with pytest.raises(UsageError, match='--grad-checkpoint: the network is an MLP'):
        train.main(toy(tmp_path / 'mlp', '--grad-checkpoint'))


@pytest.mark.slow
def test_wandb_logs_offline_and_a_resumed_run_continues_its_wandb_run(tmp_path):
    pytest.importorskip('wandb', reason='--wandb needs the wandb package: pip install wandb')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}
    for iters in (3, 6):                                       # a run, then its resumption
        result = subprocess.run([sys.executable, 'train.py', *toy(tmp_path, '--resume', '--sample-every', 3,
                                                                  '--wandb', 'imm-test', iters=iters)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    run_id = (tmp_path / 'wandb-id').read_text()
    runs = sorted(p.name for p in (tmp_path / 'wandb').glob('offline-run-*'))
    assert len(runs) == 2 and all(name.endswith(f'-{run_id}') for name in runs)
    assert all((tmp_path / 'wandb' / name / f'run-{run_id}.wandb').stat().st_size > 0 for name in runs)


def test_wandb_missing_is_said_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)           # as if it were not installed
    with pytest.raises(UsageError, match='--wandb imm-test: the wandb package is not installed; pip install wandb'):
        train.main(toy(tmp_path / 'run', '--wandb', 'imm-test'))
    assert not (tmp_path / 'run').exists()
