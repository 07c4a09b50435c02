"""model.py: the backbones keep the network contract, and the paper preset has the paper's size."""

import json

import pytest
import torch

import model


def _conditions(B):
    return torch.rand(B) * 1000, torch.rand(B) * 1000


@pytest.mark.parametrize('num_classes', [0, 10])
def test_unet_maps_32x32_images_to_the_same_shape(num_classes):
    net = model.build_net({**model.PRESETS['tiny'], 'num_classes': num_classes})
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 10]) if num_classes else None
    assert net(x, *_conditions(2), labels).shape == x.shape


def test_unet_handles_other_resolutions_and_channels():
    net = model.build_net({**model.PRESETS['tiny'], 'img_resolution': 16, 'in_channels': 1,
                           'channel_mult': [1, 2, 2], 'attn_resolutions': [8]})
    x = torch.randn(2, 1, 16, 16)
    assert net(x, *_conditions(2)).shape == x.shape


def test_unet_runs_in_channels_last():
    net = model.build_net(model.PRESETS['tiny'])
    with torch.no_grad():
        net.out_conv.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    c = _conditions(2)
    out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), *c)
    assert torch.allclose(out, net.to(memory_format=torch.contiguous_format)(x, *c), atol=1e-5)


def test_paper_preset_has_about_55m_parameters():
    """DDPM++ for CIFAR-10: EDM's 55.73M plus IMM's second time-embedding MLP (0.33M) = 56.06M."""
    net = model.build_net(model.PRESETS['ddpmpp'])
    n = sum(p.numel() for p in net.parameters())
    assert n == 56_061_443
    second_embedding = sum(p.numel() for p in net.cond.embed_s.parameters())
    assert second_embedding == 128 * 512 + 512 + 512 * 512 + 512


def test_mlp_maps_vectors_to_the_same_shape():
    net = model.build_net({**model.PRESETS['mlp'], 'num_classes': 3})
    x = torch.randn(5, 2)
    assert net(x, *_conditions(5), torch.tensor([0, 1, 2, 3, 0])).shape == x.shape


@pytest.mark.parametrize('preset', list(model.PRESETS))
def test_output_is_exactly_zero_at_initialisation(preset):
    net = model.build_net(model.PRESETS[preset])
    x = torch.randn(2, 2) if preset == 'mlp' else torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x, *_conditions(2)), torch.zeros_like(x))


def test_both_time_conditions_change_the_output():
    net = model.build_net(model.PRESETS['mlp'])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 2)
    c = torch.full((3,), 500.0)
    base = net(x, c, c)
    assert not torch.allclose(base, net(x, c + 100, c)) and not torch.allclose(base, net(x, c, c + 100))


def test_config_rebuilds_the_same_network():
    net = model.build_net({**model.PRESETS['tiny'], 'num_classes': 4})
    config = json.loads(json.dumps(net.config))  # JSON-serialisable, as checkpoints store it
    rebuilt = model.build_net(config)
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())  # strict: same parameter names and shapes


def test_unknown_arch_is_rejected_by_name():
    with pytest.raises(ValueError, match="arch 'resnet' is not known; accepted: unet, mlp"):
        model.build_net({'arch': 'resnet'})


def test_labels_on_an_unconditional_net_are_an_error():
    net = model.build_net(model.PRESETS['mlp'])
    with pytest.raises(ValueError, match='unconditional net'):
        net(torch.randn(2, 2), *_conditions(2), torch.tensor([0, 1]))


def test_dropout_is_active_in_train_mode_only():
    net = model.build_net({**model.PRESETS['tiny'], 'dropout': 0.5})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    x, c = torch.randn(1, 3, 32, 32), _conditions(1)
    net.train()
    assert not torch.equal(net(x, *c), net(x, *c))
    net.eval()
    assert torch.equal(net(x, *c), net(x, *c))
