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

    from augment import draw_augment, apply_augment
    params = draw_augment(len(x), AUGMENT_P, generator)       # the random draws, float32 [N, 8]
    x_aug, labels = apply_augment(x, params)                 # images [N, C, H, W] in [-1, 1]; labels [N, 9]
"""
import math

import torch

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
    same transform, so the transforms have EDM's distribution, each label is one EDM gives that transform, and
    (unlike EDM's, where (w, a) and (-w, a + pi) share a label) the labels determine the transform."""
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

    Flips are exact pixel flips. The rest is one inverse map per image, output pixel p -> input point
    q = S^-1 R(angle) A^-1 (p - shift) in pixels from the image centre (EDM's composition), sampled by one bicubic
    grid_sample with reflection about the border pixels' centres (EDM's reflect padding, repeated where EDM pads
    once and then reads zeros). EDM instead resamples through 2x upsampling with a wavelet filter; bicubic is a
    simpler stand-in with the same geometry. Bicubic can overshoot at sharp edges, so the result is clipped to
    [-1, 1]. Images with no geometric transform (geometric labels all zero) are not resampled, so a zero
    augmentation changes nothing."""
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
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=x.device)
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing='ij')
    p = torch.stack([cols, rows], -1) - centre                                                # [H, W, 2] as (x, y)
    q = torch.einsum('nij,nhwj->nhwi', inverse, p - shift[:, None, None])
    moved = torch.nn.functional.grid_sample(x, (q / centre).to(x.dtype), mode='bicubic',
                                            padding_mode='reflection', align_corners=True).clamp(-1, 1)
    still = (labels[:, 2:] == 0).all(1)
    return torch.where(still[:, None, None, None], x, moved), labels
