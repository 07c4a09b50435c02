"""settings.py as a specification of which networks can run on which data: every network that settings.resolve
accepts builds and maps a batch to outputs of its shape, and every one it refuses would have failed inside model.py;
a refusal names the value and what is accepted.

The networks are built for real on the CPU where they are small, and on the meta device (shapes only, no memory,
no arithmetic) where they are not.
"""
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import settings  # noqa: E402
from data import Dataset, Latents  # noqa: E402
from model import PRESETS, build_net  # noqa: E402
from util import UsageError  # noqa: E402

UNETS = [p for p in PRESETS if PRESETS[p]['arch'] == 'unet']
DITS = [p for p in PRESETS if PRESETS[p]['arch'] == 'dit']


def data_of(side, channels=3, kind='image', name='images'):
    """A labelled dataset of 4 images (uint8) or latents (posterior means only) [channels, side, side], or 2-D
    vectors."""
    if kind == 'vector':
        x = torch.randn(4, 2)
    elif kind == 'latent':
        x = Latents(np.zeros((4, channels, side, side), np.float16), None, torch.zeros(channels), torch.ones(channels))
    else:
        x = torch.zeros(4, channels, side, side, dtype=torch.uint8)
    return Dataset(name, kind, x, torch.arange(4) % 2, 2)


def resolve(data, *flags):
    """settings.resolve's network config for these flags, or None when it refuses them."""
    try:
        return settings.resolve(settings.parse_args(['--dataset', data.name, '--batch', '8', *map(str, flags)]),
                                data, world=1)[2]
    except UsageError:
        return None


def runs(config, device='cpu'):
    """Whether build_net(config) maps a conditional batch of 2 to finite outputs of the input's shape."""
    shape = [config['dim']] if config['arch'] == 'mlp' else \
        [config['in_channels'], config['img_resolution'], config['img_resolution']]
    try:
        with torch.device(device):
            net = build_net(config)
            x, c = torch.randn(2, *shape), torch.full((2,), 500.0)
            y = net(x, c, c, torch.zeros(2, dtype=torch.long) if config['num_classes'] else None)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return False
    return y.shape == x.shape and (device == 'meta' or bool(torch.isfinite(y).all()))


def small_width(preset):
    """A width that every preset's GroupNorms or heads can split, to build its layout quickly on the CPU."""
    return 8 if PRESETS[preset]['arch'] == 'unet' else math.lcm(4, PRESETS[preset]['num_heads'])


@pytest.mark.parametrize('preset', UNETS + DITS)
def test_the_image_sides_a_network_is_refused_are_those_it_cannot_run_on(preset):
    width = small_width(preset)
    for side in [1, 2, 3, 4, 6, 7, 8, 10, 12, 16]:
        for channels in (1, 3):
            config = resolve(data_of(side, channels), '--model', preset, '--channels', width)
            built = dict(PRESETS[preset], img_resolution=side, in_channels=channels,
                         **{settings.WIDTH[PRESETS[preset]['arch']]: width})
            assert (config is not None) == runs(built), f'--model {preset} on {channels} x {side} x {side}'


@pytest.mark.parametrize('preset, widths, device', [
    ('small', range(1, 70), 'cpu'), ('tiny', range(1, 70), 'cpu'),
    ('ddpmpp', [2, 9, 30, 64, 96, 100, 128, 130, 144, 160], 'meta'),
    ('dit-s2', range(1, 50), 'meta'), ('dit-l2', [4, 12, 16, 24, 32, 48, 64], 'meta'), ('mlp', range(1, 12), 'cpu')])
def test_the_widths_a_network_is_refused_are_those_it_cannot_run_with(preset, widths, device):
    data = data_of(8, 3) if preset != 'mlp' else data_of(0, kind='vector', name='moons')
    for width in widths:
        config = resolve(data, '--model', preset, '--channels', width, '--cond')
        built = dict(PRESETS[preset], **{settings.WIDTH[PRESETS[preset]['arch']]: width}, num_classes=2)
        built.update({'dim': 2} if preset == 'mlp' else {'img_resolution': 8, 'in_channels': 3})
        assert (config is not None) == runs(built, device), f'--model {preset} --channels {width}'


def test_every_preset_runs_at_its_own_width():
    for preset in UNETS + DITS:                  # U-Nets on images, DiTs on latents (SD-VAE: 4 channels)
        data = data_of(8 if preset == 'small' else 32, *((3, 'image') if preset in UNETS else (4, 'latent')))
        config = resolve(data, '--model', preset, '--cond')
        assert config is not None and runs(config, 'meta'), preset
    assert runs(resolve(data_of(0, kind='vector', name='moons'), '--cond'))


@pytest.mark.parametrize('data, flags, message', [
    (data_of(7), [], '--model small halves the image side at each of its 2 levels but the last, so the side must be '
                     'a multiple of 2; ' "'images' holds images of side 7: pass --resolution 6 or 8 (crop and resize)"),
    (data_of(30), ['--model', 'dit-s4'], 'pass --resolution 28 or 32 (crop and resize), or one of --model tiny, small'),
    (data_of(7, 4, 'latent'), ['--model', 'dit-s2'], 'holds latents of side 7: no preset takes that side'),
    (data_of(8), ['--channels', '48'], '--channels 48: the U-Net of --model small needs an even number >= 4'),
    (data_of(8), ['--channels', '48'], 'accepted near 48: 40 or 64'),
    (data_of(8), ['--channels', '3'], 'accepted near 3: 4'),
    (data_of(8), ['--model', 'dit-s2', '--channels', '100'], 'and of its 6 heads; accepted near 100: 96 or 108'),
    (data_of(0, kind='vector', name='moons'), ['--channels', '5'],
     '--channels 5: the MLP of --model mlp needs an even number >= 4 (the time embedding); accepted near 5: 4 or 6'),
    (data_of(8), ['--dropout', '1.5'], '--dropout 1.5: accepted a probability in [0, 1]'),
])
def test_a_refusal_names_the_value_and_what_is_accepted(data, flags, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        settings.resolve(settings.parse_args(['--dataset', data.name, *flags]), data, world=1)


def test_a_dit_takes_no_augmentation_and_cifar10_gives_it_none_by_default():
    cifar = data_of(32, name='cifar10')
    args, *_ = settings.resolve(settings.parse_args(['--dataset', 'cifar10', '--model', 'dit-s2']), cifar, world=1)
    assert args.augment == 0
    args, *_ = settings.resolve(settings.parse_args(['--dataset', 'cifar10', '--model', 'tiny']), cifar, world=1)
    assert args.augment == 0.12
    with pytest.raises(UsageError, match=re.escape('--augment 0.1: --model dit-s2 is a DiT, which has no')):
        settings.resolve(settings.parse_args(['--dataset', 'cifar10', '--model', 'dit-s2', '--augment', '0.1']),
                         cifar, world=1)
