"""EDM's non-leaking augmentation in augment.py as a specification: what each transform does to an image, how
accurately and how EDM resamples it, what the augmentation labels say about it, and how the draws stay the same
across seeds, resumes and ranks."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repository root

from augment import AUGMENT_DIM, AUGMENT_P, _warp, apply_augment, draw_augment  # noqa: E402
from util import UsageError  # noqa: E402


def images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def only(column, value, n=4):
    """Parameters for n images with one transform set and all others off."""
    params = torch.zeros(n, 8)
    params[:, column] = value
    return params


def test_p_zero_is_the_identity_with_zero_labels_and_draws_nothing():
    x, gen = images(), torch.Generator().manual_seed(0)
    state = gen.get_state()
    out, labels = apply_augment(x, draw_augment(len(x), 0.0, gen))
    assert torch.equal(out, x)
    assert labels.shape == (len(x), AUGMENT_DIM) and not labels.any()
    assert torch.equal(gen.get_state(), state)


def test_x_flip_alone_is_an_exact_flip_with_label_one():
    x = images()
    out, labels = apply_augment(x, only(0, 1.0))
    assert torch.equal(out, x.flip(3))
    assert torch.equal(labels, F.one_hot(torch.zeros(len(x), dtype=torch.long), AUGMENT_DIM).float())


def test_y_flip_alone_is_an_exact_flip_with_label_one():
    x = images()
    out, labels = apply_augment(x, only(1, 1.0))
    assert torch.equal(out, x.flip(2)) and torch.equal(labels[:, 1], torch.ones(len(x)))


def test_resampling_through_the_identity_gives_the_image_back():
    x = images(size=32)          # noise: the sym6 filter is orthonormal, so downsampling undoes upsampling exactly
    out = _warp(x, torch.eye(2).expand(len(x), 2, 2), torch.zeros(len(x), 2))
    torch.testing.assert_close(out, x, atol=2e-5, rtol=0)


def test_whole_pixel_translation_is_a_shift_with_reflected_border():
    x = images(size=16)                                   # w_tx = 1 is 16 / 8 = 2 pixels to the right
    out, labels = apply_augment(x, only(6, 1.0))
    torch.testing.assert_close(out, F.pad(x, (2, 0, 0, 0), mode='reflect')[..., :16], atol=2e-5, rtol=0)
    assert torch.equal(labels[:, 7], torch.ones(len(x)))


def wave(x, y):
    """A band-limited image (periods of 12 to 32 pixels), as a function of pixel coordinates from the image centre:
    its exact transform is known at every point."""
    return (0.3 * torch.sin(2 * math.pi * (0.06 * x + 0.02 * y) + 0.3)
            + 0.25 * torch.cos(2 * math.pi * (-0.04 * x + 0.06 * y) + 1.1)
            + 0.2 * torch.sin(2 * math.pi * (0.03 * x - 0.07 * y) + 2.0))


PIVOT = -0.049   # EDM's rotations and scalings turn about (PIVOT, PIVOT) pixels from the centre (augment.py)


def source_points_from_labels(labels, size):
    """Where each output pixel's value comes from, read from the labels alone (EDM's layout): the content is
    flipped, scaled by s, rotated by -angle, stretched by a along `axis` (1/a across) about the pivot, then shifted."""
    flip_x, flip_y, w_scale, cos_m1, sin, aniso_x, aniso_y, w_tx, w_ty = labels.double().unbind(1)
    angle = torch.atan2(sin, cos_m1 + 1)
    axis, w_aniso = torch.atan2(aniso_y, aniso_x), torch.hypot(aniso_x, aniso_y)
    backwards = (axis < 0) | (axis >= math.pi)              # the axis is in [0, pi): a negative w_aniso
    axis, w_aniso = torch.where(backwards, axis + math.pi, axis) % math.pi, torch.where(backwards, -w_aniso, w_aniso)

    def rotation(a):
        return torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], 1).view(-1, 2, 2)

    def scaling(sx, sy):
        return torch.diag_embed(torch.stack([sx, sy], 1))

    s, a = 2 ** (0.2 * w_scale), 2 ** (0.2 * w_aniso)
    forward = rotation(-axis) @ scaling(a, 1 / a) @ rotation(axis) @ rotation(-angle) @ scaling(s, s)
    shift = torch.stack([w_tx, w_ty], 1) * size / 8
    c = (size - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing='ij')
    p = torch.stack([cols, rows], -1).double()                            # [H, W, 2] as (x, y)
    q = torch.linalg.solve(forward[:, None, None], (p - shift[:, None, None] - PIVOT)[..., None])[..., 0] + PIVOT
    flips = torch.stack([1 - 2 * flip_x, 1 - 2 * flip_y], 1)               # a flip negates a centred coordinate
    return q * flips[:, None, None]


def transformed_wave(n, seed, size=32):
    """Wave images augmented at p = 1, their exact transform read from the labels, and which pixels take their
    value from 3 or more pixels inside the image (nearer the edges, reflection is not the wave)."""
    c = (size - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing='ij')
    x = wave(cols.double(), rows.double()).float().expand(n, 3, size, size)
    out, labels = apply_augment(x, draw_augment(n, 1.0, torch.Generator().manual_seed(seed)))
    q = source_points_from_labels(labels, size)
    return out[:, 0], wave(q[..., 0], q[..., 1]).float(), (q.abs() < c - 3).all(-1), labels


def test_labels_describe_the_transform():
    out, expected, inside, labels = transformed_wave(64, seed=1)
    assert inside.sum() > inside.numel() / 4
    error = (out - expected)[inside].abs().max()
    assert error < 0.02, f"augmented image differs from the labels' transform by {error}"
    assert (labels[:, [2, 3, 4, 5, 7, 8]] != 0).all()      # p = 1: every geometric transform was applied ...
    assert (labels[:, 6] != 0).any() and (labels[:, 6] == 0).any()   # ... along a rotated axis half the time


def test_a_band_limited_image_is_transformed_as_accurately_as_by_edms_pipeline():
    # Mean errors here, with the same transforms: EDM's pipeline 1.2e-3 (measured outside this repository); bicubic
    # resampling 8.3e-3 (it turns about the centre); the sym6 filter reversed 6.0e-2; Daubechies' db6 filter 0.28.
    out, expected, inside, _ = transformed_wave(256, seed=2)
    error = (out - expected)[inside].abs().mean()
    assert error < 2.5e-3, f"mean error {error} on a band-limited image"


def test_shrinking_fine_stripes_does_not_alias_them():
    size = 32                                             # 0.45 cycles per pixel, shrunk by 2^-0.7 to 0.73: past
    stripes = torch.cos(2 * math.pi * 0.45 * torch.arange(size)).expand(4, 3, size, size)   # Nyquist (0.5)
    out, _ = apply_augment(stripes, only(2, -3.5))
    rms = out[..., 8:24, 8:24].pow(2).mean().sqrt()       # the input's is 0.71; bicubic keeps 0.49 as false stripes
    assert rms < 0.1, f"shrunk stripes keep an rms of {rms}"


def test_same_seed_gives_the_same_augmentation():
    x = images(8)
    a = apply_augment(x, draw_augment(8, 0.5, torch.Generator().manual_seed(3)))
    b = apply_augment(x, draw_augment(8, 0.5, torch.Generator().manual_seed(3)))
    c = apply_augment(x, draw_augment(8, 0.5, torch.Generator().manual_seed(4)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_same_step_draws_the_same_augmentation_on_one_and_two_ranks():
    x = images(8, size=32)
    params = draw_augment(8, 1.0, torch.Generator().manual_seed(5))   # the global batch, on every rank
    whole, whole_labels = apply_augment(x, params)
    halves = [apply_augment(x[rows], params[rows]) for rows in (slice(0, 4), slice(4, 8))]
    # the same to float rounding: a convolution may sum in another order for another batch size
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_labels)


def test_an_image_is_resampled_as_if_alone_in_its_batch():
    x = images(2, size=32)                 # a strong shrink, and a stronger one that needs all the padding there is:
    params = torch.tensor([[0, 0, -2.85, -1.7, 1.76, 0, -1.27, 0.45],   # padding the batch as EDM does, by its most
                           [0, 0, -6.0, math.pi / 4, 0, 0, 0, 0]])      # demanding image, moves the first by 7e-4
    torch.testing.assert_close(apply_augment(x, params)[0][:1], apply_augment(x[:1], params[:1])[0], atol=1e-6, rtol=0)


def test_output_is_finite_and_not_clamped():
    x = images(64, size=32).sign()                        # sharp edges ring past [-1, 1] (to about +-1.95 here), as
    out, labels = apply_augment(x, draw_augment(64, 1.0, torch.Generator().manual_seed(6)))   # in EDM's pipeline
    assert out.isfinite().all() and labels.isfinite().all()
    assert out.max() > 1.5 and out.min() < -1.5 and out.abs().max() < 3


def test_probabilities_are_edms_cifar10_setting():
    params = draw_augment(200_000, AUGMENT_P, torch.Generator().manual_seed(7))
    applied = (params != 0).float().mean(0)
    expected = [0.5, 0.06, 0.12, 0.12, 0.12, 0.5, 0.12, 0.12]   # the axis is drawn for every image
    torch.testing.assert_close(applied, torch.tensor(expected), atol=0.005, rtol=0)
    assert AUGMENT_P == 0.12 and AUGMENT_DIM == 9


@pytest.mark.parametrize('p', [1.5, -0.1, float('nan')])
def test_bad_probability_is_refused(p):
    with pytest.raises(UsageError, match=rf"{p}.*\[0, 1\]"):
        draw_augment(4, p, torch.Generator())
