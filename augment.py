"""
EDM's non-leaking augmentation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), as its CIFAR-10 setting uses it. The IMM paper's Table 5 lists "EDM augmentation" for
CIFAR-10 but states no probability; AUGMENT_P is EDM's CIFAR-10 value. Each image gets a random geometric
transform, and the parameters of that transform are fed to the network as augmentation labels (AUGMENT_DIM
numbers, all zero for no transform). Sampling passes zero labels, so the generator learns the un-augmented
images and the transforms never leak into samples. What EDM's CIFAR-10 setting enables, in this order, and
with which probability at p = 0.12:
  x-flip (a fair coin whenever p > 0: EDM multiplies p by 1e8 for it), y-flip (p, then a fair coin),
  isotropic scaling, rotation, anisotropic scaling, fractional translation (p each). No integer translation,
  no integer rotation, no colour transforms.
Labels, in EDM's layout: [x-flip, y-flip, w_scale, cos(angle) - 1, sin(angle),
                          w_aniso cos(axis), w_aniso sin(axis), w_tx, w_ty]
where the scale is 2^(0.2 w_scale), the angle is uniform in (-pi, pi), the anisotropic scaling is 2^(0.2 w_aniso)
along the direction at angle `axis` (0, or half the time uniform in [0, pi)) and its inverse across it, and the
shift is (w_tx W, w_ty H) / 8 pixels; every w ~ N(0, 1).
Training draws the global batch with draw_augment and each rank applies its rows: the same step draws the same
augmentation on 1 and N ranks. Randomness is separate from math: apply_augment takes the draws as input.

Resampling, as EDM does it (apply_augment, _warp). Flips are exact pixel flips. The other transforms compose into
one inverse map per image, output point -> input point in pixels from the image centre, and the image is resampled
through a grid twice as fine:
  1. reflect-pad it by as far as the map sends its corners beyond its edges, plus 6 pixels, at most W - 1 and
     H - 1 (as far as reflection goes), zeros beyond;
  2. upsample 2x with the low-pass filter of the sym6 wavelet: zeros between the pixels, then the filter along x
     and along y;
  3. read that bilinearly (zeros outside) at the mapped points of a 2x output grid a few pixels wider than the image;
  4. downsample 2x with the same filter, which undoes step 2 exactly where nothing moved (the filter is orthonormal).
Nothing is clamped: sharp edges ring past [-1, 1] (to about +-1.6 on uniform noise), as in EDM. EDM places upsampled
sample 2i on pixel i, as the filter's largest tap (index 5) would; its centre of mass (index 5.098) lies 0.049
pixels further along, so EDM's rotations and scalings turn about a point 0.049 pixels left of and above the image
centre (a half turn lands 0.1 pixels off). We keep all of this, and differ from EDM in three ways:
  - EDM pads a whole batch by the most any of its images needs; where an image's reads reach past its own padding
    (strong shrinking, outermost pixels), its result depends on the rest of its batch (by up to 2e-4 in the
    comparison below). We pad each image by what it needs itself: EDM's result for that image alone, in any batch
    and on any rank.
  - Images with no geometric transform are returned as they are; EDM resamples them through the identity, which
    gives them back to float32 rounding (5e-6).
  - The axis of the anisotropic scaling is drawn in [0, pi), where EDM draws (-pi, pi) (see draw_augment).
Measured against EDM's AugmentPipe in its CIFAR-10 setting, by a comparison outside this repository that gives
EDM's pipeline and ours the same draws (2048 transforms each at p = 1 and at p = 0.12, on 32x32 images that are
sums of smooth sinusoids and on uniform noise in [-1, 1], EDM on one image at a time), the images differ by at most
3.3e-6 on the smooth images and 3.5e-5 on noise: float32 rounding.

    from augment import draw_augment, apply_augment
    params = draw_augment(len(x), AUGMENT_P, generator)       # the random draws, float32 [N, 8]
    x_aug, labels = apply_augment(x, params)                 # images [N, C, H, W] in [-1, 1]; labels [N, 9]
"""
import math

import torch
import torch.nn.functional as F

from util import UsageError

AUGMENT_P = 0.12           # EDM's CIFAR-10 augmentation probability (the IMM paper states none)
AUGMENT_DIM = 9            # augmentation labels per image, EDM's layout (see above)
AUGMENT_LOG2_STD = 0.2     # std of log2 of the isotropic and anisotropic scalings
AUGMENT_SHIFT_STD = 0.125  # std of the fractional translation, in image sizes


def draw_augment(n, p, generator):
    """Random augmentation parameters for n images: float32 [n, 8] on the generator's device.

    Columns: x-flip, y-flip (0 or 1), w_scale, angle, w_aniso, axis, w_tx, w_ty (see above); an all-zero row is
    no augmentation. p = 0 draws nothing from the generator (a run without augmentation keeps its random stream).
    The axis of the anisotropic scaling is drawn in [0, pi) where EDM draws (-pi, pi): axes a and a + pi are the
    same transform, so the transforms and the labels have EDM's distributions, and each label is one EDM gives that
    transform. We keep this because our labels determine the transform: EDM gives a stretch along an axis, (w, a),
    and a squeeze along it, (-w, a + pi), the same label."""
    if not 0 <= p <= 1:
        raise UsageError(f"augmentation probability {p} must be in [0, 1] (EDM's CIFAR-10 value is {AUGMENT_P})")
    device = generator.device
    params = torch.zeros(n, 8, device=device)
    if p == 0:
        return params
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device)
    on = lambda prob: (rand(n) < prob).float()                      # which images get a transform
    params[:, 0] = on(0.5)                                           # x-flip: always attempted (EDM: xflip=1e8)
    params[:, 1] = on(0.5) * on(p)                                   # y-flip
    params[:, 2] = randn(n) * on(p)                                  # isotropic scaling
    params[:, 3] = (rand(n) * 2 - 1) * math.pi * on(p)               # rotation
    params[:, 4] = randn(n) * on(p)                                  # anisotropic scaling ...
    params[:, 5] = rand(n) * math.pi * on(0.5)                       # ... along a rotated axis half the time
    params[:, 6:8] = randn(n, 2) * on(p)[:, None]                    # fractional translation
    return params


def _rotation(angle):
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([cos, -sin, sin, cos], 1).view(-1, 2, 2)


def _scaling(sx, sy):
    return torch.diag_embed(torch.stack([sx, sy], 1))


def apply_augment(x, params):
    """Images x [N, C, H, W] in [-1, 1], transformed by params [N, 8] from draw_augment: (x_aug, labels [N, 9]).

    Flips are exact pixel flips. The rest is one inverse map per image, output pixel q -> input point
    S^-1 R(angle) A^-1 (q - shift) in pixels from the image centre (EDM's composition), resampled by _warp. Images
    with no geometric transform (geometric labels all zero) are not resampled, so a zero augmentation changes
    nothing (EDM resamples them through the identity, which gives them back to float32 rounding)."""
    flip_x, flip_y, w_scale, angle, w_aniso, axis, w_tx, w_ty = params.float().unbind(1)
    labels = torch.stack([flip_x, flip_y, w_scale, angle.cos() - 1, angle.sin(),
                          w_aniso * axis.cos(), w_aniso * axis.sin(), w_tx, w_ty], 1)
    x = torch.where(flip_x.bool()[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_y.bool()[:, None, None, None], x.flip(2), x)
    h, w = x.shape[2:]
    scale, aniso = 2 ** (AUGMENT_LOG2_STD * w_scale), 2 ** (AUGMENT_LOG2_STD * w_aniso)
    inverse = (_scaling(1 / scale, 1 / scale) @ _rotation(angle)
               @ _rotation(-axis) @ _scaling(1 / aniso, aniso) @ _rotation(axis))             # [N, 2, 2]
    shift = torch.stack([w_tx * w, w_ty * h], 1) * AUGMENT_SHIFT_STD                          # [N, 2] pixels
    still = (labels[:, 2:] == 0).all(1)
    return torch.where(still[:, None, None, None], x, _warp(x, inverse, shift)), labels


# The low-pass (scaling) filter of the sym6 wavelet, Daubechies' least-asymmetric wavelet with 6 vanishing moments
# (as PyWavelets lists it: pywt.Wavelet('sym6').dec_lo). It is orthonormal: it sums to sqrt(2) and is orthogonal to
# its shifts by an even number of taps, so downsampling with it undoes upsampling with it.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
PEAK = 5  # SYM6's largest tap: where EDM's alignment puts a pixel's upsampled sample (see the module docstring)


def _upsample(x):
    """2x upsampling of [B, 1, H, W] to [B, 1, 2H, 2W]: zeros between the pixels, then SYM6 along x and along y (a
    strided transposed convolution per axis). Dropping PEAK samples at the start puts sample 2i on pixel i."""
    taps = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    x = F.conv_transpose2d(x, taps.view(1, 1, 1, -1), stride=(1, 2), padding=(0, PEAK))
    return F.conv_transpose2d(x, taps.view(1, 1, -1, 1), stride=(2, 1), padding=(PEAK, 0))


def _downsample(x):
    """2x downsampling of [B, 1, 2H + 10, 2W + 10] to [B, 1, H, W], the adjoint of _upsample: SYM6 along x and y at
    every second sample, no padding. Pixel i is centred, by the largest tap, on sample 2i + PEAK."""
    taps = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    x = F.conv2d(x, taps.view(1, 1, 1, -1), stride=(1, 2))
    return F.conv2d(x, taps.view(1, 1, -1, 1), stride=(2, 1))


def _padding(inverse, shift, centre, limit):
    """EDM's padding of each image [N, 4], in whole pixels before it along x and y, then after it: as far as the
    inverse map sends the image's corners beyond its edges, plus 6 (twice the 3 pixels, a quarter of the filter, by
    which EDM's output frame exceeds the image), from 0 up to `limit` (W - 1, H - 1: as far as reflection goes)."""
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], device=centre.device) * centre
    p = torch.einsum('nij,nkj->nki', inverse, corners - shift[:, None])                      # [N, 4 corners, 2]
    reach = torch.cat([(-p).amax(1), p.amax(1)], 1) - centre.repeat(2) + 6
    return torch.minimum(reach.clamp(min=0), limit.repeat(2)).ceil()


def _keep(x, first, last):
    """Images x [N, C, H', W'] with zeros outside each one's rows first[:, 1]..last[:, 1] and columns
    first[:, 0]..last[:, 0] (inclusive)."""
    rows, cols = torch.arange(x.shape[2], device=x.device), torch.arange(x.shape[3], device=x.device)
    keep_rows = (rows >= first[:, 1, None]) & (rows <= last[:, 1, None])                    # [N, H']
    keep_cols = (cols >= first[:, 0, None]) & (cols <= last[:, 0, None])                    # [N, W']
    return x * (keep_rows[:, None, :, None] & keep_cols[:, None, None, :]).to(x.dtype)


def _warp(x, inverse, shift):
    """EDM's resampling of images x [N, C, H, W]: output point q takes the value at input point inverse @ (q - shift)
    (points in pixels from the image centre, as (x, y)), through a grid twice as fine: the module docstring's steps."""
    n, c, h, w = x.shape
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=x.device)
    limit = torch.tensor([w - 1, h - 1], device=x.device)
    # 1. Reflect-pad each image by its own _padding, zeros beyond (EDM pads a batch by the most any image needs):
    #    batched, reflect-pad all by the limit, then zero what lies beyond each image's padding. In the padded image
    #    pixel i of x is pixel i + limit, and each image keeps pixels first..last.
    padding = _padding(inverse, shift, centre, limit)
    first, last = limit - padding[:, :2], limit + 2 * centre + padding[:, 2:]               # [N, 2] as (x, y)
    x = _keep(F.pad(x, (w - 1, w - 1, h - 1, h - 1), mode='reflect'), first, last)
    # 2. Upsample 2x: sample 2i lies on padded pixel i. EDM's upsampled image ends half a pixel after its padded
    #    image, zeros beyond.
    up = _upsample(x.reshape(n * c, 1, *x.shape[2:])).view(n, c, 2 * x.shape[2], 2 * x.shape[3])
    up = _keep(up, 2 * first, 2 * last + 1)
    # 3. The output at 2x, on the samples that the downsampling reads: sample j lies on output pixel (j - PEAK) / 2,
    #    and H x W output pixels read 2H + 10 x 2W + 10 samples, 2.5 pixels beyond each edge of the image.
    cols = torch.arange(2 * w + len(SYM6) - 2, device=x.device)
    rows = torch.arange(2 * h + len(SYM6) - 2, device=x.device)
    q = (torch.stack(torch.meshgrid(cols, rows, indexing='xy'), -1) - PEAK) / 2 - centre    # [2H+10, 2W+10, 2]
    p = torch.einsum('nij,nhwj->nhwi', inverse, q - shift[:, None, None])                   # input points
    # Input point p is sample 2 (p + centre + limit) of `up`; grid_sample (align_corners=False) puts sample k of an
    # axis of L samples at (2k + 1) / L - 1. Bilinear with zeros outside, as EDM's.
    size = torch.tensor([up.shape[3], up.shape[2]], device=x.device)
    grid = (4 * (p + centre + limit) + 1) / size - 1
    up = F.grid_sample(up, grid.to(x.dtype), mode='bilinear', padding_mode='zeros', align_corners=False)
    # 4. Downsample 2x with the same filter, to H x W pixels. Not clamped, as EDM's.
    return _downsample(up.reshape(n * c, 1, *up.shape[2:])).view(n, c, h, w)
