"""model.DiT: the authors' ImageNet backbone (DiT with IMM's second time embedding) keeps the network contract,
has the paper's size, and class-conditions through a table whose last row is the null class."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import imm
import model

TINY = {**model.PRESETS['dit-s2'], 'img_resolution': 8, 'hidden_size': 32, 'depth': 2, 'num_heads': 4,
        'num_classes': 10}


def _conditions(B):
    return torch.rand(B) * 1000, torch.rand(B) * 1000


def random_net(config, seed=0):
    """Our net with every weight random (nothing zero), so every layer shows in the output."""
    torch.manual_seed(seed)
    net = model.build_net(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.2)
    return net


def random_dit(config=TINY, seed=0):
    """A DiT with every weight random, the zero-initialised modulations and output layer included."""
    return random_net(config, seed)


@pytest.mark.parametrize('patch_size', [2, 4])
def test_dit_maps_latents_to_the_same_shape(patch_size):
    net = random_dit({**TINY, 'patch_size': patch_size})
    x = torch.randn(3, 4, 8, 8)
    assert net(x, *_conditions(3), torch.tensor([0, 9, 10])).shape == x.shape


def test_dit_config_rebuilds_the_same_network():
    net = model.build_net(model.PRESETS['dit-b4'] | {'depth': 1})
    assert net.config['arch'] == 'dit' and model.build_net(net.config).config == net.config
    assert {'img_resolution', 'in_channels', 'num_classes'} <= net.config.keys()


def test_dit_xl2_has_the_papers_675m_parameters_and_118_6_gmacs():
    """DiT-XL/2 (Peebles & Xie: 675,129,632 with its fixed positions counted and an 8-channel output for the learned
    variance) + IMM's second time MLP (256 x 1152 + 1152 x 1152 + biases) - 4 output channels - the fixed positions,
    which are a buffer here. One forward on 32x32x4 latents: 118.6 G multiply-adds (the paper's '118.6 GFLOPs')."""
    with torch.device('meta'):
        net = model.build_net(model.PRESETS['dit-xl2'])
        x, c = torch.empty(1, 4, 32, 32), torch.empty(1)
        with FlopCounterMode(display=False) as flops:
            net(x, c, c, torch.zeros(1, dtype=torch.long))
    second_time = sum(p.numel() for p in net.embed_s.parameters())
    assert second_time == 256 * 1152 + 1152 + 1152 * 1152 + 1152
    assert sum(p.numel() for p in net.parameters()) == 675_129_632 + second_time - 1152 * 16 - 16 - 256 * 1152
    assert round(flops.get_total_flops() / 2e9, 1) == 118.6


def test_dit_output_is_exactly_zero_at_initialisation():
    """adaLN-Zero: every modulation and the output layer start at zero, so G = 0 and f_{s,t}(x_t) is the DDIM
    jump of a zero prediction (euler_fm: x_t itself)."""
    net = model.build_net(TINY)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(net(x, *_conditions(2), torch.tensor([3, 10])), torch.zeros_like(x))


def test_at_initialisation_only_the_output_layer_receives_gradient():
    net = model.build_net(TINY)
    out = net(torch.randn(2, 4, 8, 8), *_conditions(2), torch.tensor([1, 2]))
    (out * torch.randn_like(out)).sum().backward()
    touched = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {'out.weight', 'out.bias'}


def test_gradients_reach_every_parameter():
    net = random_dit()
    net(torch.randn(2, 4, 8, 8), *_conditions(2), torch.tensor([1, 10])).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_the_null_class_is_the_last_row_of_the_label_table():
    net = random_dit()
    x, (c_t, c_s) = torch.randn(2, 4, 8, 8), _conditions(2)
    null = torch.full((2,), 10)
    assert net.embed_label.num_embeddings == 11
    assert torch.equal(net(x, c_t, c_s, null), net(x, c_t, c_s))        # no labels = the null class
    with torch.no_grad():
        net.embed_label.weight[10] += 1
    assert not torch.allclose(net(x, c_t, c_s, null), net(x, c_t, c_s, torch.tensor([3, 4])))
    with torch.no_grad():
        net.embed_label.weight[:10] += 1                                  # only the null row is used for it
    assert torch.equal(net(x, c_t, c_s, null), net(x, c_t, c_s))


def test_guidance_one_is_the_conditional_output():
    net, cfg = random_dit(), imm.IMMConfig(param='euler_fm', eps=0.0, second_time='t-s')
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 9])
    assert torch.equal(imm.one_step(net, x, 0.3, 0.8, cfg, labels, guidance=1.0),
                       imm.one_step(net, x, 0.3, 0.8, cfg, labels))


def test_guidance_w_mixes_conditional_and_null_outputs():
    """Eq. 14: G_w = w G(c) + (1 - w) G(null), inside f_{s,t}."""
    net, cfg, w = random_dit(), imm.IMMConfig(param='euler_fm', eps=0.0), 1.5
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 9])
    _, c_out = imm.c_skip_out(0.3, 0.8, cfg)
    x_in = imm.c_in(0.8, cfg).float() * x
    c_t, c_s = torch.full((3,), 800.), torch.full((3,), 300.)
    G = w * net(x_in, c_t, c_s, labels) + (1 - w) * net(x_in, c_t, c_s, torch.full((3,), 10))
    assert torch.allclose(imm.one_step(net, x, 0.3, 0.8, cfg, labels, guidance=w), x + c_out.float() * G, atol=1e-6)


def test_augment_labels_are_refused_and_an_unconditional_dit_refuses_labels():
    net = model.build_net({**TINY, 'num_classes': 0})
    x = torch.randn(2, 4, 8, 8)
    assert net(x, *_conditions(2)).shape == x.shape                       # the one row: the null class
    with pytest.raises(ValueError, match='no augmentation input'):
        net(x, *_conditions(2), augment_labels=torch.zeros(2, 9))
    with pytest.raises(ValueError, match='unconditional DiT'):
        net(x, *_conditions(2), torch.tensor([0, 0]))


def test_a_float64_dit_computes_in_float64():
    net = random_dit()
    x, (c_t, c_s), labels = torch.randn(2, 4, 8, 8), _conditions(2), torch.tensor([1, 10])
    out32, out64 = net(x, c_t, c_s, labels), net.double()(x.double(), c_t.double(), c_s.double(), labels)
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), out32, atol=1e-5)
