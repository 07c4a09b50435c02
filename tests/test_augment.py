"""EDM's non-leaking augmentation in augment.py as a specification: what each transform does to an image, what the
augmentation labels say about it, and how the draws stay the same across seeds, resumes and ranks."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repository root

from augment import AUGMENT_DIM, AUGMENT_P, apply_augment, draw_augment  # noqa: E402
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


def test_quarter_turn_is_a_rotation_of_the_pixel_grid():
    x = images()
    out, labels = apply_augment(x, only(3, math.pi / 2))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(labels[:, 3:5], torch.tensor([[-1.0, 1.0]]).expand(len(x), 2))


def test_whole_pixel_translation_is_a_shift_with_reflected_border():
    x = images(size=16)                                   # w_tx = 1 is 16 / 8 = 2 pixels to the right
    out, labels = apply_augment(x, only(6, 1.0))
    torch.testing.assert_close(out, F.pad(x, (2, 0, 0, 0), mode='reflect')[..., :16], atol=1e-5, rtol=0)
    assert torch.equal(labels[:, 7], torch.ones(len(x)))


def smooth(x, y):
    """A smooth image, as a function of pixel coordinates from the image centre."""
    return 0.5 * torch.sin(0.15 * x + 0.1 * y) * torch.cos(0.12 * y - 0.05 * x)


def source_points_from_labels(labels, size):
    """Where each output pixel's value comes from, read from the labels alone (EDM's layout): the content is
    flipped, scaled by s, rotated by -angle, stretched by a along `axis` (1/a across), then shifted."""
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
    q = torch.linalg.solve(forward[:, None, None], (p - shift[:, None, None])[..., None])[..., 0]
    flips = torch.stack([1 - 2 * flip_x, 1 - 2 * flip_y], 1)               # a flip negates a centred coordinate
    return q * flips[:, None, None]


def test_labels_describe_the_transform():
    size, n = 32, 64
    c = (size - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing='ij')
    x = smooth(cols.float(), rows.float()).expand(n, 3, size, size)
    out, labels = apply_augment(x, draw_augment(n, 1.0, torch.Generator().manual_seed(1)))
    q = source_points_from_labels(labels, size)
    inside = (q.abs() < c - 1.5).all(-1)                  # bicubic reads only pixels of the image, no reflection
    assert inside.sum() > n * size * size / 4
    expected = smooth(q[..., 0], q[..., 1]).float()
    error = (out[:, 0] - expected)[inside].abs().max()
    assert error < 0.01, f"augmented image differs from the labels' transform by {error}"
    assert (labels[:, [2, 3, 4, 5, 7, 8]] != 0).all()      # p = 1: every geometric transform was applied ...
    assert (labels[:, 6] != 0).any() and (labels[:, 6] == 0).any()   # ... along a rotated axis half the time


def test_geometric_transforms_are_resampled_smoothly():
    size = 32
    c = (size - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing='ij')
    x = smooth(cols.float(), rows.float()).expand(4, 3, size, size)
    for column, value in [(2, 1.0), (4, -1.5), (7, 0.3)]:   # scaling, anisotropic scaling, fractional shift
        params = only(column, value)
        params[:, 5] = 0.7                                  # the axis of the anisotropic scaling
        out, labels = apply_augment(x, params)
        q = source_points_from_labels(labels, size)
        inside = (q.abs() < c - 1.5).all(-1)
        torch.testing.assert_close(out[:, 0][inside], smooth(q[..., 0], q[..., 1]).float()[inside], atol=0.01, rtol=0)


def test_same_seed_gives_the_same_augmentation():
    x = images(8)
    a = apply_augment(x, draw_augment(8, 0.5, torch.Generator().manual_seed(3)))
    b = apply_augment(x, draw_augment(8, 0.5, torch.Generator().manual_seed(3)))
    c = apply_augment(x, draw_augment(8, 0.5, torch.Generator().manual_seed(4)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_same_step_draws_the_same_augmentation_on_one_and_two_ranks():
    x = images(8)
    params = draw_augment(8, 0.5, torch.Generator().manual_seed(5))   # the global batch, on every rank
    whole, whole_labels = apply_augment(x, params)
    halves = [apply_augment(x[rows], params[rows]) for rows in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_labels)


def test_output_is_finite_and_in_range():
    x = images(64, size=32).sign()                        # sharp edges: bicubic would overshoot without the clip
    out, labels = apply_augment(x, draw_augment(64, 1.0, torch.Generator().manual_seed(6)))
    assert out.isfinite().all() and labels.isfinite().all()
    assert out.min() >= -1 and out.max() <= 1


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
