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


def test_mlp_output_layer_starts_random_not_zero():
    """PyTorch's default init (a zero output layer left the toys' IMM loss at its floor for hundreds of steps)."""
    net = model.build_net(model.PRESETS['mlp'])
    x = torch.randn(2, 2)
    assert net.out.weight.abs().min() > 0 and net(x, *_conditions(2)).abs().min() > 1e-4


@pytest.mark.parametrize('preset', ['ddpmpp', 'tiny'])
def test_unet_output_starts_within_1e_4_of_zero(preset):
    """EDM's (and the authors') initialisation: the output conv is xavier-uniform x 1e-5, not zero, so the
    output starts at ~1e-5 for unit inputs: tiny, but not exactly zero."""
    net = model.build_net(model.PRESETS[preset])
    x = torch.randn(2, 3, 32, 32)
    out = net(x, *_conditions(2))
    assert out.abs().max() < 1e-4 and out.abs().max() > 0


def test_unet_initialisation_is_edms():
    """xavier-uniform weights (bound sqrt(6 / (fan_in + fan_out))), zero biases, qkv x sqrt(0.2), and the
    residual branches' last layers and the output conv x 1e-5."""
    torch.manual_seed(0)
    net = model.build_net(model.PRESETS['tiny'])

    def bound(layer):
        fan_in, fan_out = layer.weight[0].numel(), layer.weight[:, 0].numel()
        return (6 / (fan_in + fan_out)) ** 0.5

    blk = next(b for b in net.enc if b.attention)
    for layer, scale in [(net.stem, 1), (blk.conv0, 1), (blk.affine, 1), (net.cond.embed_t.mlp[0], 1),
                         (blk.qkv, 0.2 ** 0.5), (blk.conv1, 1e-5), (blk.proj, 1e-5), (net.out_conv, 1e-5)]:
        w = layer.weight.abs().max().item()
        assert 0.9 * scale * bound(layer) < w <= scale * bound(layer), layer
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_a_zero_augmentation_label_is_the_same_as_none():
    net = model.build_net({**model.PRESETS['tiny'], 'augment_dim': 9})
    with torch.no_grad():
        net.out_conv.weight.normal_()
    x, c = torch.randn(2, 3, 32, 32), _conditions(2)
    assert torch.equal(net(x, *c, augment_labels=torch.zeros(2, 9)), net(x, *c))
    assert not torch.allclose(net(x, *c, augment_labels=torch.ones(2, 9)), net(x, *c))


def test_augmentation_labels_on_a_net_without_that_input_are_an_error():
    net = model.build_net(model.PRESETS['tiny'])
    with pytest.raises(ValueError, match='augment_dim=0'):
        net(torch.randn(2, 3, 32, 32), *_conditions(2), augment_labels=torch.zeros(2, 9))


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


# ---- activation checkpointing (train.py --grad-checkpoint): less memory, the same gradients

TINY_DIT = {**model.PRESETS['dit-s2'], 'img_resolution': 8, 'hidden_size': 32, 'depth': 2, 'num_heads': 4,
            'num_classes': 10, 'dropout': 0.1}


def _imm_gradients(config, grad_checkpoint, x, labels):
    """Gradients of the IMM loss (target pass under no_grad, then the gradient pass; dropout on) from fixed draws."""
    import imm
    torch.manual_seed(0)
    net = model.build_net(config).train()
    with torch.no_grad():                                  # every weight random: no zero-initialised branch hides
        for p in net.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.2)
    net.grad_checkpoint = grad_checkpoint
    cfg = imm.IMMConfig()
    gen = torch.Generator().manual_seed(1)
    t, s = imm.draw_times(len(x) // cfg.particles, cfg, generator=gen)
    noise = cfg.sigma_d * torch.randn(x.shape, generator=gen)
    torch.manual_seed(2)                                   # the dropout masks
    imm.imm_loss(net, x, noise, t, s, cfg, labels).backward()
    return {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize('config', [{**model.PRESETS['tiny'], 'img_resolution': 8, 'dropout': 0.2}, TINY_DIT],
                         ids=['unet-dropout', 'dit-dropout'])
def test_grad_checkpoint_gives_the_gradients_of_the_plain_network(config):
    x = torch.randn(8, config['in_channels'], 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % 10 if config['num_classes'] else None
    plain, checkpointed = (_imm_gradients(config, on, x, labels) for on in (False, True))
    assert all(plain[k].abs().sum() > 0 for k in plain)   # dropout and every block are in the gradient
    for k in plain:                                        # the recomputation draws the same dropout masks
        assert torch.equal(plain[k], checkpointed[k]), k


def test_grad_checkpoint_is_a_no_op_without_gradients_and_not_part_of_the_config(monkeypatch):
    calls = []
    monkeypatch.setattr(model, 'checkpoint', lambda fn, *args, **kw: calls.append(1) or fn(*args))
    net = model.build_net(TINY_DIT)
    net.grad_checkpoint = True
    x, c = torch.randn(2, 4, 8, 8), _conditions(2)
    with torch.no_grad():                                  # IMM's target pass, sampling
        net(x, *c)
    assert calls == []
    net(x, *c)
    assert len(calls) == TINY_DIT['depth'] and 'grad_checkpoint' not in net.config
