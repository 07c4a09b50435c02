"""Latent data (the paper's ImageNet-256 path) as a specification: how a latent array is read (memory-mapped) and
normalised, how a training step draws its latents, the ImageNet settings they bring, the encode step (vae.py) and
the decode step of sample.py.

The VAE is a tiny randomly initialised diffusers AutoencoderKL written to a folder with save_pretrained: nothing is
downloaded. Tests that need diffusers skip without it (requirements-test.txt installs it).
"""
import importlib.util
import json
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
sys.path.insert(0, str(ROOT / 'tools'))

import checkpoint  # noqa: E402
import latent_memory  # noqa: E402
import sample as sample_script  # noqa: E402
import train  # noqa: E402
import vae as vae_script  # noqa: E402
import authors  # noqa: E402
import settings  # noqa: E402
from util import UsageError  # noqa: E402
from data import SIGMA_D, Latents, decode, denormalise_latents, fits_on_device, latent_statistics, load_dataset, \
    normalise_latents  # noqa: E402

MEAN, STD = np.float32(authors.IMAGENET_LATENT_MEAN), np.float32(authors.IMAGENET_LATENT_STD)
CPU = torch.device('cpu')


def latent_file(path, n=16, side=8, labels=True, posterior_std=True, save=np.savez, **keys):
    """A small ImageNet-like latent .npz as vae.py writes it: posterior means with the release's per-channel
    statistics and the posterior's stds (posterior_std=False: a file of the means alone, as vae.py wrote before)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, 4, side, side)) * STD[:, None, None] + MEAN[:, None, None]).astype(np.float16)
    arrays = dict(x=x, latent_mean=MEAN, latent_std=STD, **keys)
    if posterior_std:
        arrays['posterior_std'] = rng.uniform(0.1, 1.0, x.shape).astype(np.float16)
    if labels:
        arrays['labels'] = np.arange(n) % 2
    save(path, **arrays)
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
    assert data.kind == 'latent' and isinstance(data.x, Latents) and list(data.x.shape) == [16, 4, 8, 8]
    assert data.num_classes == 2 and data.vae == 'some/vae' and len(data.x) == 16
    assert np.allclose(data.mean, MEAN) and np.allclose(data.std, STD)
    x = data.x.batch(torch.arange(16))                      # the posterior means, normalised per batch in float32
    expected = (raw.astype(np.float64) - MEAN[:, None, None]) / STD[:, None, None] * SIGMA_D
    assert x.dtype == torch.float32 and np.allclose(x.numpy(), expected, atol=1e-6)
    assert np.allclose(decode(x, data.kind, data.mean, data.std), raw.astype(np.float32), atol=1e-5)   # raw latents
    info = checkpoint.data_info(data)
    assert info['kind'] == 'latent' and info['shape'] == [4, 8, 8] and info['scale'] == SIGMA_D
    assert info['vae'] == 'some/vae' and np.allclose(info['mean'], MEAN) and np.allclose(info['std'], STD)


@pytest.mark.parametrize('suffix', ['.npz', '.npy'])
def test_latents_stay_in_their_file_memory_mapped(tmp_path, suffix):
    path = tmp_path / f'latents{suffix}'
    raw = latent_file(path) if suffix == '.npz' else np.save(path, latent_file(tmp_path / 'unused.npz'))
    data = load_dataset(str(path))
    for array in (data.x.posterior_mean, data.x.posterior_std) if suffix == '.npz' else (data.x.posterior_mean,):
        assert isinstance(array, np.memmap) and array.filename == str(path) and array.mode == 'r'
    assert raw is None or np.array_equal(data.x.posterior_mean, raw)


def test_a_float_array_without_statistics_is_normalised_by_its_own_channels(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((32, 3, 4, 4)) * np.array([1.0, 10.0, 0.1])[:, None, None] + 5
    np.save(tmp_path / 'latents.npy', raw.astype(np.float32))
    data = load_dataset(str(tmp_path / 'latents.npy'))
    assert data.kind == 'latent' and data.num_classes == 0 and data.vae is None and data.x.posterior_std is None
    x = data.x.batch(torch.arange(32))
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.full((3,), SIGMA_D), atol=1e-3)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-3)


def test_latent_statistics_are_those_of_the_draws_mean_plus_std_times_n():
    rng = np.random.default_rng(2)
    mean = rng.standard_normal((64, 3, 4, 4)) * np.array([1.0, 3.0, 0.5])[:, None, None] + 2
    std = rng.uniform(0.5, 2.0, mean.shape)
    draws = mean + std * rng.standard_normal((200, *mean.shape))         # 200 uses of every latent
    computed = latent_statistics(mean, std)
    assert np.allclose(computed[0], draws.mean((0, 1, 3, 4)), rtol=0.01)
    assert np.allclose(computed[1], draws.std((0, 1, 3, 4)), rtol=0.01)
    assert np.allclose(latent_statistics(mean)[1], mean.std((0, 2, 3)))   # without stds: the array's own


@pytest.mark.parametrize('arrays, words', [
    (dict(x=np.zeros((2, 4, 8, 8), np.uint8), latent_mean=MEAN, latent_std=STD), 'keys of latents'),
    (dict(x=np.zeros((2, 4, 8, 6), np.float32), latent_mean=MEAN, latent_std=STD), 'H = W'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), latent_mean=MEAN[:3], latent_std=STD[:3]), 'one per channel'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), latent_mean=MEAN, latent_std=0 * STD), 'std > 0'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), latent_mean=MEAN), 'only one of'),
    (dict(x=np.full((2, 4, 8, 8), np.nan, np.float32), latent_mean=MEAN, latent_std=STD), 'x holds NaN'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), posterior_std=np.zeros((2, 4, 4, 4), np.float32)), 'the shape of x'),
    (dict(x=np.zeros((2, 4, 8, 8), np.float32), posterior_std=np.full((2, 4, 8, 8), np.inf, np.float32)),
     'posterior_std holds NaN or infinite'),
])
def test_bad_latent_arrays_are_refused_by_name(tmp_path, arrays, words):
    np.savez(tmp_path / 'bad.npz', **arrays)
    with pytest.raises(UsageError, match=words):
        load_dataset(str(tmp_path / 'bad.npz'))


# ---- A training step's latents

def latent_batches(path, *flags, world=1, place=None, step=3):
    """draw_batch's (x, noise, t, s, labels) of step `step` on the latents at path, whole and per rank, with the data
    placed on the CPU as train.py places it (place=True/False: whole on the device / mapped, instead of its choice)."""
    data = load_dataset(str(path))
    args, cfg, _, M, _ = settings.resolve(settings.parse_args(
        ['--dataset', str(path), '--model', 'tiny', '--batch', '16', *flags]), data, world)
    if place is None:
        data = train.place_data(data, args, CPU, lambda *a: None)
    else:
        data = train.dataclasses.replace(data, x=data.x.placed(CPU, place, args.latent_draw))
    return [train.draw_batch(step, data, args, cfg, M, rank, world)[:5] for rank in range(world)]


def same(a, b):
    return all(u is v is None or torch.equal(u, v) for u, v in zip(a, b))


def test_mapped_npz_and_npy_give_the_batches_of_the_arrays_loaded_whole(tmp_path):
    raw = latent_file(tmp_path / 'latents.npz', n=40)
    latent_file(tmp_path / 'compressed.npz', n=40, save=np.savez_compressed)      # not mappable: read into memory
    assert not isinstance(load_dataset(str(tmp_path / 'compressed.npz')).x.posterior_mean, np.memmap)
    np.save(tmp_path / 'means.npy', raw)
    mapped = latent_batches(tmp_path / 'latents.npz', place=False)[0]
    assert same(mapped, latent_batches(tmp_path / 'latents.npz', place=True)[0])     # copied whole to the device
    assert same(mapped, latent_batches(tmp_path / 'compressed.npz')[0])
    npy = latent_batches(tmp_path / 'means.npy', place=False)[0]
    assert same(npy, latent_batches(tmp_path / 'means.npy', place=True)[0])
    data, rows = load_dataset(str(tmp_path / 'means.npy')), train.batch_rows(3, 16, 40, 0, CPU)
    assert np.allclose(decode(npy[0], 'latent', data.mean, data.std), raw[rows.numpy()], atol=1e-3)   # those rows


def test_each_use_draws_mean_plus_std_times_n_from_the_steps_generator(tmp_path):
    latent_file(tmp_path / 'latents.npz', n=64)
    drawn, = latent_batches(tmp_path / 'latents.npz', '--batch', '64', '--cond')
    means, = latent_batches(tmp_path / 'latents.npz', '--batch', '64', '--cond', '--no-latent-draw')
    assert same(drawn[1:], means[1:])                     # the same rows, noise, times and labels: drawn last
    data = load_dataset(str(tmp_path / 'latents.npz'))
    rows = train.batch_rows(3, 64, 64, 0, CPU)
    scale = torch.from_numpy(data.x.posterior_std[rows.numpy()]).float() * SIGMA_D / data.std[:, None, None]
    n = (drawn[0] - means[0]) / scale                     # x = normalise(mean + std * n)
    assert abs(float(n.mean())) < 0.05 and abs(float(n.std()) - 1) < 0.05
    assert not torch.allclose(n, drawn[1] / SIGMA_D, atol=0.1)          # not the noise of the loss
    assert same(drawn, latent_batches(tmp_path / 'latents.npz', '--batch', '64', '--cond')[0])   # fixed by step
    assert not torch.equal(drawn[0], latent_batches(tmp_path / 'latents.npz', '--batch', '64', step=4)[0][0])


def test_latent_draws_on_two_ranks_split_the_one_rank_batch(tmp_path):
    latent_file(tmp_path / 'latents.npz', n=24)
    whole, = latent_batches(tmp_path / 'latents.npz', '--cond')
    halves = latent_batches(tmp_path / 'latents.npz', '--cond', world=2)
    assert all(torch.equal(a, torch.cat([b0, b1])) for a, b0, b1 in zip(whole, *halves))


def test_posterior_means_reproduce_the_batches_of_latents_stored_normalised_in_float16(tmp_path):
    raw = latent_file(tmp_path / 'latents.npz', n=40)
    x, *_ = latent_batches(tmp_path / 'latents.npz', '--no-latent-draw')[0]
    rows = train.batch_rows(3, 16, 40, 0, CPU)
    stored = normalise_latents(torch.from_numpy(raw).float(), torch.from_numpy(MEAN), torch.from_numpy(STD)).half()
    assert torch.allclose(x, stored[rows].float(), atol=2e-3)   # before: normalised once, kept in float16
    assert torch.allclose(x, normalise_latents(torch.from_numpy(raw[rows.numpy()]).float(), torch.from_numpy(MEAN),
                                               torch.from_numpy(STD)))


def test_a_resumed_run_with_latent_draws_ends_with_the_same_weights(tmp_path):
    latent_file(tmp_path / 'latents.npz')
    flags = ['--dataset', str(tmp_path / 'latents.npz'), '--model', 'tiny', '--batch', '8', '--precision', 'fp32',
             '--sample-every', '0', '--device', 'cpu', '--threads', '1']
    assert train.main(flags + ['--iters', '2', '--out', str(tmp_path / 'straight')]) == 0
    assert train.main(flags + ['--iters', '1', '--out', str(tmp_path / 'resumed')]) == 0
    assert train.main(flags + ['--iters', '2', '--out', str(tmp_path / 'resumed'), '--resume']) == 0
    a, b = (torch.load(tmp_path / run / 'ckpt.pt', weights_only=True)['net'] for run in ('straight', 'resumed'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_says_whether_latents_are_on_the_device_or_mapped(tmp_path, capsys):
    latent_file(tmp_path / 'latents.npz')
    flags = ['--dataset', str(tmp_path / 'latents.npz'), '--model', 'tiny', '--iters', '1', '--batch', '8',
             '--precision', 'fp32', '--out', str(tmp_path / 'run'), '--sample-every', '0', '--device', 'cpu',
             '--threads', '1']
    assert train.main(flags) == 0
    assert 'latents: posterior means and stds, 0.00 GiB, memory-mapped from' in capsys.readouterr().out
    assert not fits_on_device(1, CPU)                      # a CPU run keeps the map: a copy is what it saves


def test_a_file_of_posterior_means_alone_trains_on_them_with_a_note(tmp_path, capsys):
    latent_file(tmp_path / 'means.npz', posterior_std=False)
    flags = ['--dataset', str(tmp_path / 'means.npz'), '--model', 'tiny', '--iters', '1', '--batch', '8',
             '--precision', 'fp32', '--out', str(tmp_path / 'run'), '--sample-every', '0', '--device', 'cpu',
             '--threads', '1']
    assert train.main(flags + ['--latent-draw']) == 0
    out = capsys.readouterr().out
    assert 'holds no posterior_std' in out and 'latents: posterior means, ' in out
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['args']['latent_draw'] is False


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='the tool reads memory from Linux /proc')
def test_the_memory_tool_writes_latent_files_that_train_py_maps_and_reads_them_all(tmp_path, capsys):
    latent_memory.main(['write', str(tmp_path / 'both.npz'), '--n', '8'])
    latent_memory.main(['write', str(tmp_path / 'means.npz'), '--n', '8', '--means-only'])
    both, means = (load_dataset(str(tmp_path / f)) for f in ('both.npz', 'means.npz'))
    assert isinstance(both.x.posterior_std, np.memmap) and means.x.posterior_std is None
    assert list(both.x.shape) == [8, 4, 32, 32] and np.allclose(both.mean, MEAN) and both.vae == authors.DEFAULT_VAE
    capsys.readouterr()
    latent_memory.main(['epoch', str(tmp_path / 'both.npz')])
    line = json.loads(capsys.readouterr().out)
    assert {'load_s', 'epoch_s', 'loaded', 'after_epoch'} <= set(line) and line['after_epoch']['VmHWM'] > 0


def test_latent_draws_are_refused_for_data_without_a_posterior():
    with pytest.raises(UsageError, match='only latents'):
        settings.resolve(settings.parse_args(['--dataset', 'moons', '--latent-draw']), load_dataset('moons'), 1)


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

def encode_folder(tmp_path, tiny_vae, sizes=((40, 24), (24, 36), (70, 70)), classes=('cat', 'dog', 'dog')):
    """vae.py on a folder of random images (one per size, in the class folders named), -> the .npz's arrays."""
    rng = np.random.default_rng(0)
    for name, size in zip(classes, sizes):
        os.makedirs(tmp_path / 'images' / name, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / 'images' / name / f'{size[0]}x{size[1]}.png')
    vae_script.main([str(tmp_path / 'images'), '--out', str(tmp_path / 'latents.npz'), '--vae', tiny_vae,
                     '--resolution', '16', '--batch', '2', '--workers', '0', '--device', 'cpu'])
    with np.load(tmp_path / 'latents.npz') as f:
        return dict(f)


def test_encode_crops_like_adm_and_writes_latents_with_labels(tmp_path, tiny_vae):
    f = encode_folder(tmp_path, tiny_vae)
    assert f['x'].dtype == f['posterior_std'].dtype == np.float16 and f['x'].shape == f['posterior_std'].shape == (
        3, 4, 8, 8)
    assert f['labels'].tolist() == [0, 1, 1] and f['classes'].tolist() == ['cat', 'dog'] and str(f['vae']) == tiny_vae
    data = load_dataset(str(tmp_path / 'latents.npz'))
    assert data.kind == 'latent' and data.num_classes == 2 and data.vae == tiny_vae
    assert isinstance(data.x.posterior_mean, np.memmap) and isinstance(data.x.posterior_std, np.memmap)   # mappable
    assert not [p for p in os.listdir(tmp_path) if p not in ('images', 'latents.npz')]    # written atomically
    crop = vae_script.center_crop(Image.fromarray(np.arange(70 * 70 * 3, dtype=np.uint8).reshape(70, 70, 3)), 16)
    assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8


def test_the_posterior_mean_and_std_of_each_image_are_written(tmp_path, tiny_vae):
    f = encode_folder(tmp_path, tiny_vae, sizes=[(40, 24)], classes=['cat'])
    with Image.open(tmp_path / 'images' / 'cat' / '40x24.png') as image:
        crop = vae_script.center_crop(image.convert('RGB'), 16)
    mean, std = vae_script.encode_images(vae_script.load_vae(tiny_vae, CPU),
                                         torch.tensor(crop).permute(2, 0, 1)[None])
    assert np.allclose(f['x'], mean.numpy(), rtol=2e-3, atol=1e-4)                     # float16
    assert np.allclose(f['posterior_std'], std.numpy(), rtol=2e-3) and (std > 0).all()


def test_vae_writes_the_statistics_of_its_latent_draws_over_the_whole_set(tmp_path, tiny_vae):
    f = encode_folder(tmp_path, tiny_vae)
    mean, std = f['x'].astype(np.float64), f['posterior_std'].astype(np.float64)
    assert f['latent_mean'].dtype == f['latent_std'].dtype == np.float64
    assert np.allclose(f['latent_mean'], mean.mean((0, 2, 3)), rtol=1e-12)
    # the draws mean + std * n: the variance of the means plus the mean posterior variance
    assert np.allclose(f['latent_std'], np.sqrt(mean.var((0, 2, 3)) + (std ** 2).mean((0, 2, 3))), rtol=1e-12)


def test_sd_vae_ft_ema_gets_the_releases_statistics_with_a_warning_when_ours_differ(capsys):
    z = np.random.default_rng(0).standard_normal((64, 4, 8, 8))
    z = (z - z.mean((0, 2, 3), keepdims=True)) / z.std((0, 2, 3), keepdims=True)        # exactly 0 and 1 per channel
    release_mean, release_std = np.array(authors.IMAGENET_LATENT_MEAN), np.array(authors.IMAGENET_LATENT_STD)
    like_release = z * release_std[:, None, None] + release_mean[:, None, None]
    for shift, warned in ((0.0, False), (0.05, True)):
        means = like_release + shift * release_std[2] * (np.arange(4) == 2)[:, None, None]   # channel 2 moved
        written = vae_script.normalisation(authors.DEFAULT_VAE, means, np.zeros_like(means))
        assert np.array_equal(written['latent_mean'], release_mean)
        assert np.array_equal(written['latent_std'], release_std)
        printed = capsys.readouterr()
        assert "the release's for stabilityai/sd-vae-ft-ema, written" in printed.out        # beside ours
        assert ('warning: ' in printed.err and 'up to 5.0%' in printed.err and 'mean of channel 2' in printed.err) \
            == warned
    assert np.allclose(vae_script.normalisation('other/vae', like_release, np.zeros_like(z))['latent_std'],
                       release_std)                      # another VAE: its own statistics


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
