"""sample.py as a specification: what it writes, how its seeds behave, and how it refuses bad input.

Checkpoints are built here (a tiny net in the checkpoint dict of notes/contracts.md), so these tests do not
depend on train.py; one end-to-end test runs train.py then sample.py as a user would.
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import sample as sample_script  # noqa: E402
from imm import IMMConfig  # noqa: E402
from model import PRESETS, build_net  # noqa: E402

TINY_UNET = {**PRESETS['tiny'], 'img_resolution': 8, 'attn_resolutions': []}
TINY_MLP = {**PRESETS['mlp'], 'hidden': 32, 'depth': 2}
MOONS = {'name': 'moons', 'kind': 'vector', 'shape': [2], 'num_classes': 0, 'mean': [100.0, -50.0], 'std': [10.0, 0.1]}


def image_data(num_classes=0):
    return {'name': 'cifar10', 'kind': 'image', 'shape': [3, 8, 8], 'num_classes': num_classes,
            'mean': None, 'std': None}


def make_checkpoint(path, net_config, data, loss='imm', weights_config=None):
    """A train.py-style checkpoint. The zero-initialised output layers get random weights, so samples depend on
    the network; 'ema' and 'net' differ. weights_config: build the weights from another config (a mismatch)."""
    torch.manual_seed(0)
    net = build_net(weights_config or net_config)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'net': net.state_dict(), 'ema': ema, 'opt': {}, 'scaler': None, 'step': 5,
                'args': {'loss': loss, 'dataset': data['name']}, 'net_config': build_net(net_config).config,
                'imm_config': asdict(IMMConfig()), 'data': data, 'rng': {}}, path)
    return path


def sample(*argv):
    """Run `python sample.py argv` in-process on the CPU; return the arrays of the .npz it wrote (None if --bench)."""
    sample_script.main([*map(str, argv), '--device', 'cpu'])
    if '--bench' not in argv:
        out = argv[argv.index('--out') + 1]
        with np.load(out) as f:
            return {k: f[k] for k in f.files}


def refuse(capsys, *argv):
    """Run sample.py expecting a refusal: exit status 2 and one `error:` line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        sample_script.main([*map(str, argv), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and 'Traceback' not in err
    return err


def test_images_are_uint8_nhwc_beside_the_checkpoint_with_a_grid_png(tmp_path):
    ckpt = make_checkpoint(tmp_path / 'run' / 'ckpt.pt', TINY_UNET, image_data())
    sample_script.main(['--ckpt', str(ckpt), '--steps', '2', '--n', '5', '--batch', '4', '--device', 'cpu'])
    with np.load(tmp_path / 'run' / 'samples.npz') as f:
        assert f.files == ['arr_0']  # unconditional: no labels
        assert f['arr_0'].dtype == np.uint8 and f['arr_0'].shape == (5, 8, 8, 3)
    assert (tmp_path / 'run' / 'samples.png').stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path / 'run') if '.tmp' in p]  # no temporary file left behind


def test_class_conditional_samples_save_int64_labels_and_class_fixes_them(tmp_path):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', {**TINY_UNET, 'num_classes': 3}, image_data(3))
    drawn = sample('--ckpt', ckpt, '--steps', 1, '--n', 8, '--out', tmp_path / 'a.npz')
    assert drawn['arr_1'].dtype == np.int64 and drawn['arr_1'].shape == (8,) and set(drawn['arr_1']) <= {0, 1, 2}
    fixed = sample('--ckpt', ckpt, '--steps', 1, '--n', 8, '--class', 2, '--guidance', 1.5, '--out', tmp_path / 'b.npz')
    assert (fixed['arr_1'] == 2).all() and fixed['arr_0'].shape == (8, 8, 8, 3)


def test_first_samples_do_not_depend_on_batch_size_or_n(tmp_path):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', TINY_MLP, MOONS)
    a = sample('--ckpt', ckpt, '--n', 7, '--batch', 2, '--out', tmp_path / 'a.npz')['arr_0']
    b = sample('--ckpt', ckpt, '--n', 4, '--batch', 4, '--out', tmp_path / 'b.npz')['arr_0']
    np.testing.assert_allclose(a[:4], b, rtol=1e-5, atol=1e-4)
    c = sample('--ckpt', ckpt, '--n', 4, '--batch', 4, '--seed', 1, '--out', tmp_path / 'c.npz')['arr_0']
    assert not np.allclose(b, c)  # and the seed matters
    conditional = make_checkpoint(tmp_path / 'cond.pt', {**TINY_UNET, 'num_classes': 10}, image_data(10))
    a = sample('--ckpt', conditional, '--n', 5, '--batch', 2, '--steps', 1, '--out', tmp_path / 'd.npz')
    b = sample('--ckpt', conditional, '--n', 3, '--batch', 3, '--steps', 1, '--out', tmp_path / 'e.npz')
    assert (a['arr_1'][:3] == b['arr_1']).all() and np.abs(a['arr_0'][:3].astype(int) - b['arr_0']).max() <= 1


def test_vectors_are_float32_in_the_data_units(tmp_path):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', TINY_MLP, MOONS)
    x = sample('--ckpt', ckpt, '--n', 500, '--out', tmp_path / 'moons.npz')['arr_0']
    assert x.dtype == np.float32 and x.shape == (500, 2)
    # standardised samples are O(1); in data units they sit around mean with spread ~ std (per dimension)
    assert np.all(np.abs(x - MOONS['mean']) < 6 * np.array(MOONS['std']))
    assert x[:, 0].std() > 10 * x[:, 1].std()
    assert (tmp_path / 'moons.png').exists()  # 2-D data: a scatter plot


def test_raw_uses_the_training_weights_instead_of_the_ema(tmp_path):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', TINY_MLP, MOONS)
    ema = sample('--ckpt', ckpt, '--n', 8, '--out', tmp_path / 'ema.npz')['arr_0']
    raw = sample('--ckpt', ckpt, '--n', 8, '--raw', '--out', tmp_path / 'raw.npz')['arr_0']
    assert not np.allclose(ema, raw)


def test_fm_checkpoints_sample_with_the_denoiser(tmp_path, monkeypatch, capsys):
    calls = []
    real = sample_script.sample
    monkeypatch.setattr(sample_script, 'sample', lambda *a, **kw: calls.append(kw['denoiser']) or real(*a, **kw))
    for loss in ['fm', 'imm']:
        ckpt = make_checkpoint(tmp_path / f'{loss}.pt', TINY_MLP, MOONS, loss=loss)
        sample('--ckpt', ckpt, '--n', 4, '--out', tmp_path / f'{loss}.npz')
    assert calls == [True, False]
    assert capsys.readouterr().out.count('DDIM denoiser') == 1


def test_explicit_times_set_the_grid(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', TINY_MLP, MOONS)
    x = sample('--ckpt', ckpt, '--n', 4, '--times', '0.994,0.8,0.3,0.006', '--out', tmp_path / 'x.npz')['arr_0']
    assert x.shape == (4, 2) and '3 steps, times 0.994,0.8,0.3,0.006' in capsys.readouterr().out


@pytest.mark.parametrize('times', ['0.3,0.8,0.006', '0.999,0.006', '0.994,0.5,0.001', '0.994', '0.994,x', '0.5,0.5'])
def test_bad_times_are_refused(tmp_path, capsys, times):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', TINY_MLP, MOONS)
    err = refuse(capsys, '--ckpt', ckpt, '--times', times)
    assert f'--times {times}' in err and 'strictly decreasing' in err and '[0.006, 0.994]' in err


def test_the_newest_run_is_used_and_ckpt_best_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for age, name in [(300, 'runs/old/ckpt.pt'), (200, 'runs/new/ckpt.pt'), (100, 'runs/old/ckpt-best.pt')]:
        make_checkpoint(name, TINY_MLP, MOONS)
        os.utime(name, (1e9 - age, 1e9 - age))
    sample_script.main(['--n', '4', '--device', 'cpu'])
    assert sorted(os.listdir('runs/new')) == ['ckpt.pt', 'samples.npz', 'samples.png']
    assert not (tmp_path / 'runs/old/samples.npz').exists()


def test_bench_prints_one_json_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample('--bench', '--model', 'mlp', '--steps', 1, '--batch', 8, '--bench-batches', 1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report['model'] == 'mlp' and report['steps'] == 1 and report['batch'] == 8 and report['img_per_s'] > 0
    assert os.listdir(tmp_path) == []


# --- defaults by the kind of checkpoint (settings.SAMPLING): the release's grids and guidance

TINY_DIT = {**PRESETS['dit-s2'], 'img_resolution': 4, 'hidden_size': 32, 'depth': 1, 'num_heads': 2, 'num_classes': 0}
LATENTS = {'name': 'latents.npz', 'kind': 'latent', 'shape': [4, 4, 4], 'num_classes': 3, 'mean': [0.0] * 4,
           'std': [1.0] * 4, 'scale': 0.5, 'vae': 'some/vae'}


def sampled_with(monkeypatch, ckpt, *argv):
    """(times, guidance) that sample.py passes to imm.sample for these flags; the VAE is stubbed out (decoding is
    tests/test_latents.py's), so only the sampler's settings are looked at."""
    calls = []
    real = sample_script.sample
    monkeypatch.setattr(sample_script, 'sample', lambda net, noise, times, cfg, **kw:
                        calls.append((times, kw['guidance'])) or real(net, noise, times, cfg, **kw))
    monkeypatch.setattr(sample_script, 'load_vae', lambda name, device: None)
    sample('--ckpt', ckpt, '--n', 2, '--out', ckpt.parent / 'x.npz', *argv)
    return calls[0]


def test_latent_checkpoints_sample_the_releases_uniform_grids_with_guidance_1_5(tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', {**TINY_DIT, 'num_classes': 3}, LATENTS)
    torch.save({**torch.load(ckpt), 'imm_config': asdict(IMMConfig(param='euler_fm', eps=0.0))}, ckpt)
    assert sampled_with(monkeypatch, ckpt) == ([0.994, 0.497, 0.0], 1.5)
    assert sampled_with(monkeypatch, ckpt, '--steps', 4) == ([0.994, 0.7455, 0.497, 0.2485, 0.0], 1.5)
    out = capsys.readouterr().out
    assert 'sampling (latent column of settings.SAMPLING' in out and '2 steps, times 0.994,0.497,0;' in out
    assert 'guidance 1.5' in out
    assert sampled_with(monkeypatch, ckpt, '--times', '0.994,0.6,0', '--guidance', 1) == ([0.994, 0.6, 0.0], 1.0)
    unconditional = make_checkpoint(tmp_path / 'uncond.pt', TINY_DIT, {**LATENTS, 'num_classes': 0})
    torch.save({**torch.load(unconditional), 'imm_config': asdict(IMMConfig(param='euler_fm', eps=0.0))}, unconditional)
    assert sampled_with(monkeypatch, unconditional)[1] == 1.0     # guidance needs a class-conditional net


def test_image_checkpoints_keep_cifar10s_grid_and_no_guidance_even_with_classes(tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', {**TINY_UNET, 'num_classes': 3}, image_data(3))
    times, guidance = sampled_with(monkeypatch, ckpt)
    assert times[1] == pytest.approx(1.4 / 2.4) and guidance == 1.0     # eta(t1) = 1.4: t1 = 1.4 / (1 + 1.4)
    assert 'sampling (image column of settings.SAMPLING' in capsys.readouterr().out
    assert sampled_with(monkeypatch, ckpt, '--guidance', 2)[1] == 2.0


# --- torchrun: N processes write what one writes

def torchrun_sample(tmp_path, name, *argv, ranks=2):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    launch = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}'] if ranks > 1 else []
    out = tmp_path / f'{name}.npz'
    r = subprocess.run([sys.executable, *launch, str(ROOT / 'sample.py'), *map(str, argv), '--out', str(out),
                        '--device', 'cpu'], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(out) as f:
        return {k: f[k] for k in f.files}, r.stdout


def test_two_torchrun_ranks_write_the_one_process_array(tmp_path):
    ckpt = make_checkpoint(tmp_path / 'ckpt.pt', {**TINY_UNET, 'num_classes': 3}, image_data(3))
    flags = ['--ckpt', ckpt, '--num-samples', 11, '--batch', 3, '--steps', 3, '--restart']
    one, _ = torchrun_sample(tmp_path, 'one', *flags, ranks=1)
    two, stdout = torchrun_sample(tmp_path, 'two', *flags)
    assert one.keys() == two.keys() == {'arr_0', 'arr_1'} and one['arr_0'].shape == (11, 8, 8, 3)
    assert all(np.array_equal(one[k], two[k]) for k in one)        # bit for bit, labels and images
    assert stdout.count('wrote ') == 1 and stdout.count('sampling (image column') == 1   # only rank 0 talks


@pytest.mark.parametrize('script', ['sample.py', 'train.py'])
def test_no_flag_is_mistaken_by_torchruns_parser(script):
    """argparse matches abbreviations of every option-like word, so a script flag that abbreviates two of torchrun's
    (e.g. --n: --nnodes, --nproc-per-node) stops torchrun. Every flag of both scripts passes through untouched,
    except sample.py's one-process alias --n (its torchrun form is --num-samples)."""
    from torch.distributed.run import get_args_parser
    import settings
    parser = sample_script.parser() if script == 'sample.py' else settings.parser()
    flags = [f for action in parser._actions for f in action.option_strings if f.startswith('--')]
    for flag in set(flags) - {'--help', '--n'}:
        parsed = get_args_parser().parse_args(['--standalone', '--nproc_per_node=2', script, flag, '1'])
        assert parsed.training_script == script and parsed.training_script_args == [flag, '1'], flag


# --- bad input: one clear message naming the value, exit status 2, and nothing already written is damaged

def bad_checkpoint(tmp_path, case):
    path = tmp_path / 'run' / 'ckpt.pt'
    path.parent.mkdir()
    if case == 'another model config':  # weights of a 16-channel net under a config that says 8 channels
        make_checkpoint(path, {**TINY_UNET, 'model_channels': 8}, image_data(), weights_config=TINY_UNET)
    elif case == 'corrupt file':  # e.g. a copy cut short
        make_checkpoint(path, TINY_MLP, MOONS)
        path.write_bytes(path.read_bytes()[:2000])
    elif case == 'unknown architecture':
        make_checkpoint(path, TINY_MLP, MOONS)
        torch.save({**torch.load(path), 'net_config': {'arch': 'transformer'}}, path)
    elif case == 'U-Net of before the SongUNet match':
        make_checkpoint(path, TINY_UNET, image_data())
        ckpt = torch.load(path)
        del ckpt['net_config']['augment_dim']                # written before model.UNet took augment labels
        torch.save(ckpt, path)
    elif case == 'fine':
        make_checkpoint(path, TINY_MLP, MOONS)
    elif case == 'missing keys':
        torch.save({'net': build_net(TINY_MLP).state_dict()}, path)
    return path


@pytest.mark.parametrize('case, argv, says', [
    ('another model config', [], ['does not fit the network', 'model_channels', 'ckpt.pt']),
    ('corrupt file', [], ['cannot read checkpoint', 'ckpt.pt', 'corrupt']),
    ('missing keys', [], ['lacks', "'ema'", 'ckpt.pt']),
    ('unknown architecture', [], ['cannot rebuild', "'transformer'", 'ckpt.pt']),
    ('no such file', [], ['no such file', 'ckpt.pt']),
    ('U-Net of before the SongUNet match', [], ['written before model.UNet computed', 'retrain']),
    ('fine', ['--steps', '0'], ['--steps 0', 'at least 1']),
    ('fine', ['--class', '1'], ['--class 1', 'unconditional']),
    ('fine', ['--out', 'x.pt'], ['--out x.pt', '.npz']),
])
def test_bad_input_is_refused_with_one_clear_line_and_old_samples_survive(tmp_path, capsys, case, argv, says):
    path = bad_checkpoint(tmp_path, case)
    old = tmp_path / 'run' / 'samples.npz'
    old.write_bytes(b'samples of an earlier run')
    err = refuse(capsys, '--ckpt', path, '--n', 4, *argv)
    assert all(s in err for s in says), err
    assert old.read_bytes() == b'samples of an earlier run'


def test_no_runs_says_how_to_get_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = refuse(capsys, '--steps', 2)
    assert 'no checkpoint under runs/' in err and 'python train.py' in err and '--ckpt' in err


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'sample.py'), '--ckpt', str(tmp_path / 'none.pt')],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith('error: --ckpt') and 'Traceback' not in r.stderr


@pytest.mark.slow  # two interpreters and a short training run: ~20 s on 2 CPU cores
def test_train_then_sample_end_to_end(tmp_path):
    run = lambda *argv: subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path)
    r = run(str(ROOT / 'train.py'), '--dataset', 'moons', '--iters', '5', '--batch', '16', '--channels', '32',
            '--sample-every', '0', '--out', 'runs/moons', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    r = run(str(ROOT / 'sample.py'), '--steps', '2', '--n', '100', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / 'runs' / 'moons' / 'samples.npz') as f:
        assert f['arr_0'].dtype == np.float32 and f['arr_0'].shape == (100, 2)
