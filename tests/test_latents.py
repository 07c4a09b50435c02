"""Latent data (the paper's ImageNet-256 path) as a specification: how a latent array is read and normalised, the
ImageNet settings it brings, the encode step (vae.py) and the decode step of sample.py.

The VAE is a tiny randomly initialised diffusers AutoencoderKL written to a folder with save_pretrained: nothing is
downloaded. Tests that need diffusers skip without it (requirements-test.txt installs it).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import checkpoint  # noqa: E402
import sample as sample_script  # noqa: E402
import train  # noqa: E402
import vae as vae_script  # noqa: E402
import authors  # noqa: E402
import settings  # noqa: E402
from util import UsageError  # noqa: E402
from data import SIGMA_D, decode, denormalise_latents, load_dataset, normalise_latents  # noqa: E402

MEAN, STD = np.float32(authors.IMAGENET_LATENT_MEAN), np.float32(authors.IMAGENET_LATENT_STD)


def latent_file(path, n=16, side=8, labels=True, **keys):
    """A small ImageNet-like latent .npz: raw latents with the release's per-channel statistics, as vae.py writes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, 4, side, side)) * STD[:, None, None] + MEAN[:, None, None]).astype(np.float16)
    arrays = dict(x=x, latent_mean=MEAN, latent_std=STD, **keys)
    if labels:
        arrays['labels'] = np.arange(n) % 2
    np.savez(path, **arrays)
    return x


@pytest.fixture(scope='module')
def tiny_vae(tmp_path_factory):
    """A folder holding a random AutoencoderKL: 3 -> 4 channels, downsampling by 2 (two blocks)."""
    diffusers = pytest.importorskip('diffusers', reason='the VAE tests need diffusers: pip install diffusers')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, sample_size=16, norm_num_groups=4,
                                  down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2)
    folder = tmp_path_factory.mktemp('vae') / 'tiny-vae'
    vae.save_pretrained(folder)
    return str(folder)


def run_script(*args, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- Reading and normalising

def test_normalisation_round_trips_and_gives_std_sigma_d_per_channel():
    raw = torch.randn(64, 4, 8, 8, dtype=torch.float64) * torch.tensor(STD, dtype=torch.float64)[:, None, None] \
        + torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    x = normalise_latents(raw, mean, std)
    assert torch.allclose(denormalise_latents(x, mean, std), raw, atol=1e-12)
    assert torch.allclose(x.std((0, 2, 3)), torch.full((4,), SIGMA_D, dtype=torch.float64), rtol=0.05)
    channel = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    channel[0, 1] = float(mean[1] + std[1])               # one std above channel 1's mean -> sigma_d
    assert normalise_latents(channel, mean, std)[0, 1, 0, 0] == pytest.approx(SIGMA_D)


def test_a_latent_npz_is_read_as_latents_normalised_by_its_stored_statistics(tmp_path):
    raw = latent_file(tmp_path / 'latents.npz', vae=np.str_('some/vae'))
    data = load_dataset(str(tmp_path / 'latents.npz'))
    assert data.kind == 'latent' and data.x.dtype == torch.float16 and list(data.x.shape) == [16, 4, 8, 8]
    assert data.num_classes == 2 and data.vae == 'some/vae'
    assert np.allclose(data.mean, MEAN) and np.allclose(data.std, STD)
    expected = (raw.astype(np.float64) - MEAN[:, None, None]) / STD[:, None, None] * SIGMA_D
    assert np.allclose(data.x.float().numpy(), expected, atol=2e-3)        # float16 storage
    assert np.allclose(decode(data.x, data.kind, data.mean, data.std), raw.astype(np.float32), atol=2e-2)   # decode undoes it: raw latents
    info = checkpoint.data_info(data)
    assert info['kind'] == 'latent' and info['shape'] == [4, 8, 8] and info['scale'] == SIGMA_D
    assert info['vae'] == 'some/vae' and np.allclose(info['mean'], MEAN) and np.allclose(info['std'], STD)


def test_a_float_array_without_statistics_is_normalised_by_its_own_channels(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((32, 3, 4, 4)) * np.array([1.0, 10.0, 0.1])[:, None, None] + 5
    np.save(tmp_path / 'latents.npy', raw.astype(np.float32))
    data = load_dataset(str(tmp_path / 'latents.npy'))
    assert data.kind == 'latent' and data.num_classes == 0 and data.vae is None
    assert torch.allclose(data.x.float().std((0, 2, 3), unbiased=False), torch.full((3,), SIGMA_D), atol=1e-3)
    assert torch.allclose(data.x.float().mean((0, 2, 3)), torch.zeros(3), atol=1e-3)


@pytest.mark.parametrize('arrays, words', [
    (dict(x=np.zeros((2, 4, 8, 8), np.uint8), latent_mean=MEAN, latent_std=STD), 'keys of latents'),
    (dict(x=np.zeros((2, 4, 8, 6), np.float32), latent_mean=MEAN, latent_std=STD), 'H = W'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), latent_mean=MEAN[:3], latent_std=STD[:3]), 'one per channel'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), latent_mean=MEAN, latent_std=0 * STD), 'std > 0'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), latent_mean=MEAN), 'only one of'),
    (dict(x=np.full((2, 4, 8, 8), np.nan, np.float32), latent_mean=MEAN, latent_std=STD), 'NaN'),
])
def test_bad_latent_arrays_are_refused_by_name(tmp_path, arrays, words):
    np.savez(tmp_path / 'bad.npz', **arrays)
    with pytest.raises(UsageError, match=words):
        load_dataset(str(tmp_path / 'bad.npz'))


# ---- The ImageNet settings

def test_latents_bring_the_papers_imagenet_settings(tmp_path):
    latent_file(tmp_path / 'imagenet-latents.npz')
    data = load_dataset(str(tmp_path / 'imagenet-latents.npz'))
    args, cfg, net_config, M, micro = settings.resolve(
        settings.parse_args(['--dataset', str(tmp_path / 'imagenet-latents.npz')]), data, 1)
    assert args.model == 'dit-xl2' and (net_config['arch'], net_config['hidden_size'], net_config['depth']) == (
        'dit', 1152, 28)
    assert (cfg.schedule, cfg.param, cfg.eps, cfg.T, cfg.k, cfg.a, cfg.b) == ('fm', 'euler_fm', 0.0, 0.994, 12, 2.0, 4.0)
    assert (cfg.second_time, cfg.min_gap, cfg.particles, cfg.sigma_d) == ('t-s', 1e-4, 4, 0.5)
    assert (args.optimizer, args.lr, args.batch, args.ema, args.iters) == ('adamw', 1e-4, 4096, 0.9999, 1_200_000)
    assert (args.precision, args.cond, args.label_dropout, args.augment) == ('fp16', True, 0.1, 0.0)
    assert net_config['num_classes'] == 2 and net_config['in_channels'] == 4 and net_config['img_resolution'] == 8


def test_unlabelled_latents_train_unconditionally_and_flags_override_the_defaults(tmp_path):
    latent_file(tmp_path / 'latents.npz', labels=False)
    data = load_dataset(str(tmp_path / 'latents.npz'))
    args, cfg, *_ = settings.resolve(settings.parse_args(
        ['--dataset', str(tmp_path / 'latents.npz'), '--model', 'tiny', '--a', '1', '--second-time', 's',
         '--min-gap', '0', '--optimizer', 'radam', '--precision', 'tf32']), data, 1)
    assert args.cond is False and (cfg.a, cfg.second_time, cfg.min_gap) == (1.0, 's', 0.0)
    assert (args.optimizer, args.precision, cfg.param) == ('radam', 'tf32', 'euler_fm')
    with pytest.raises(UsageError, match='has no labels'):
        settings.resolve(settings.parse_args(['--dataset', 'x.npz', '--model', 'tiny', '--cond']), data, 1)


def test_images_and_vectors_keep_radam_and_the_cifar10_method_settings_but_vectors_use_euler_fm():
    for kind in ('image', 'vector'):
        defaults = settings.defaults(kind)
        assert (defaults['optimizer'], defaults['precision'], defaults['cond']) == ('radam', 'tf32', False)
        assert defaults['k'] == {'image': 15, 'vector': 10}[kind]   # toys: k = 10 (docs/experiments.md)
        assert (defaults['a'], defaults['b'], defaults['second_time'], defaults['min_gap']) == (1.0, 5.0, 's', 0.0)
    # toys: the ImageNet parameterization (docs/experiments.md, "Toy defaults that differ from the paper")
    assert settings.defaults('image')['param'] == 'simple_edm' and settings.defaults('vector')['param'] == 'euler_fm'


@pytest.mark.parametrize('flags, param, eps', [
    ([], 'euler_fm', 0.0), (['--param', 'identity'], 'identity', 0.006), (['--param', 'simple_edm'], 'simple_edm', 0.006),
    (['--param', 'simple_edm', '--eps', '0'], 'simple_edm', 0.0), (['--eps', '0.01'], 'euler_fm', 0.01)])
def test_eps_left_out_follows_the_parameterization_as_the_paper_pairs_them(flags, param, eps):
    args, cfg = settings.resolve(settings.parse_args(['--dataset', 'moons', *flags]), load_dataset('moons'), 1)[:2]
    assert (cfg.param, cfg.eps, args.eps) == (param, eps, eps)


def test_a_latent_run_refuses_what_needs_pixels(tmp_path):
    latent_file(tmp_path / 'latents.npz')
    data = load_dataset(str(tmp_path / 'latents.npz'))
    flags = ['--dataset', str(tmp_path / 'latents.npz'), '--model', 'tiny']
    with pytest.raises(UsageError, match='decoded'):
        settings.resolve(settings.parse_args(flags + ['--fid-every', '10', '--fid-ref', __file__]), data, 1)
    with pytest.raises(UsageError, match='0 for vectors and latents'):
        settings.resolve(settings.parse_args(flags + ['--augment', '0.1']), data, 1)
    with pytest.raises(UsageError, match='U-Net|unet|for images|MLP'):
        settings.resolve(settings.parse_args(flags[:2] + ['--model', 'mlp']), data, 1)


# ---- End to end: encode, train, sample, decode

def test_encode_crops_like_adm_and_writes_latents_with_labels(tmp_path, tiny_vae):
    rng = np.random.default_rng(0)
    for name, size in [('cat', (40, 24)), ('dog', (24, 36)), ('dog', (70, 70))]:
        os.makedirs(tmp_path / 'images' / name, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / 'images' / name / f'{size[0]}x{size[1]}.png')
    vae_script.main([str(tmp_path / 'images'), '--out', str(tmp_path / 'latents.npz'), '--vae', tiny_vae,
                     '--resolution', '16', '--batch', '2', '--workers', '0', '--device', 'cpu'])
    with np.load(tmp_path / 'latents.npz') as f:
        assert f['x'].dtype == np.float16 and f['x'].shape == (3, 4, 8, 8)
        assert f['labels'].tolist() == [0, 1, 1] and f['classes'].tolist() == ['cat', 'dog']
        assert np.allclose(f['latent_mean'], MEAN) and str(f['vae']) == tiny_vae
    data = load_dataset(str(tmp_path / 'latents.npz'))
    assert data.kind == 'latent' and data.num_classes == 2 and data.vae == tiny_vae
    assert not list(tmp_path.glob('*.tmp*'))               # written atomically
    crop = vae_script.center_crop(Image.fromarray(np.arange(70 * 70 * 3, dtype=np.uint8).reshape(70, 70, 3)), 16)
    assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8


def test_center_crop_halves_with_a_box_filter_then_crops_the_middle():
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, 32:96] = 255                                  # a white middle square, black either side
    crop = vae_script.center_crop(Image.fromarray(image), 32)   # 64x128 -> box halving to 32x64 -> middle 32x32
    assert crop.shape == (32, 32, 3) and (crop == 255).all()


def test_a_latent_run_trains_samples_and_decodes_to_uint8_images(tmp_path, tiny_vae):
    latent_file(tmp_path / 'latents.npz', vae=np.str_(tiny_vae))
    out = tmp_path / 'run'
    flags = ['--dataset', tmp_path / 'latents.npz', '--model', 'dit-s2', '--channels', 96, '--iters', 2, '--batch', 8,
             '--precision', 'fp32', '--out', out, '--sample-every', 2, '--device', 'cpu']
    assert train.main(list(map(str, flags))) == 0
    ckpt = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['data']['kind'] == 'latent' and ckpt['data']['vae'] == tiny_vae and ckpt['data']['scale'] == SIGMA_D
    assert ckpt['args']['optimizer'] == 'adamw' and ckpt['net_config']['num_classes'] == 2
    assert ckpt['net_config']['arch'] == 'dit' and ckpt['net_config']['hidden_size'] == 96
    assert 'exp_avg' in next(iter(ckpt['opt']['state'].values()))
    assert (out / 'samples' / '0000002-2step.png').exists()     # latent channels as a preview
    sample_script.main(['--ckpt', str(out), '--steps', '8', '--guidance', '1.5', '--n', '5', '--batch', '3',
                        '--out', str(tmp_path / 'samples.npz'), '--device', 'cpu'])
    with np.load(tmp_path / 'samples.npz') as f:
        assert f['arr_0'].dtype == np.uint8 and f['arr_0'].shape == (5, 16, 16, 3)   # NHWC, ADM's layout
        assert f['arr_1'].shape == (5,) and f['arr_0'].std() > 0
    assert Image.open(tmp_path / 'samples.png').size == (3 * 17 + 1, 2 * 17 + 1)
    sample_script.main(['--ckpt', str(out), '--times', '0.994,0.497,0', '--n', '2', '--out',
                        str(tmp_path / 'uniform2.npz'), '--device', 'cpu'])     # the release's uniform 2-step grid
    assert np.load(tmp_path / 'uniform2.npz')['arr_0'].shape == (2, 16, 16, 3)


def test_sampling_latents_without_a_vae_or_diffusers_is_a_clear_error(tmp_path, monkeypatch, capsys):
    latent_file(tmp_path / 'latents.npz')                  # no 'vae' key
    out = tmp_path / 'run'
    flags = ['--dataset', tmp_path / 'latents.npz', '--model', 'tiny', '--iters', 1, '--batch', 8, '--precision',
             'fp32', '--out', out, '--sample-every', 0, '--device', 'cpu']
    assert train.main(list(map(str, flags))) == 0

    def refused(*extra):
        with pytest.raises(SystemExit):
            sample_script.main(['--ckpt', str(out), '--n', '2', '--device', 'cpu', *extra])
        return capsys.readouterr().err
    assert 'pass --vae' in refused()
    if importlib.util.find_spec('diffusers') is not None:      # with diffusers, a folder that holds no VAE
        assert 'cannot load an AutoencoderKL' in refused('--vae', str(tmp_path / 'no-such-vae'))
    monkeypatch.setitem(sys.modules, 'diffusers', None)    # as if not installed: import diffusers fails
    assert 'pip install diffusers' in refused('--vae', 'stabilityai/sd-vae-ft-ema')
    assert not (tmp_path / 'run' / 'samples.npz').exists()


def test_vae_script_errors_are_one_line(tmp_path):
    result = run_script('vae.py', tmp_path / 'nowhere', '--out', tmp_path / 'x.npz', '--device', 'cpu')
    assert result.returncode == 2 and 'no such folder' in result.stderr and 'Traceback' not in result.stderr


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    latent_file(tmp_path / 'latents.npz')
    flags = ['--dataset', str(tmp_path / 'latents.npz'), '--model', 'tiny', '--iters', '1', '--batch', '8',
             '--precision', 'fp32', '--out', str(tmp_path / 'run'), '--sample-every', '0', '--device', 'cpu']
    assert train.main(flags) == 0
    with pytest.raises(UsageError, match="args.optimizer: checkpoint 'adamw', flags 'radam'"):
        train.main(flags + ['--iters', '2', '--resume', '--optimizer', 'radam'])
