"""authors.load_pickle: the authors' released pickle (lumalabs/imm) is read as data, never run, and
becomes our UNet computing the same function.

The files here are written by this test in the authors' on-disk layout, as their torch_utils/persistence.py
writes it: pickle.dump(dict(ema=IMMPrecond)), each of their modules pickled as a call of
torch_utils.persistence._reconstruct_persistent_obj on a record {type, version, module_src, class_name, state},
state being the module's __dict__ (with the constructor's keyword arguments as _init_kwargs)."""

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import authors
import checkpoint
import model
from util import UsageError
from test_dit import random_net  # every weight random
from test_latents import tiny_vae  # noqa: F401  (a fixture: a tiny random SD-VAE in a folder)

COND_TINY = {**model.PRESETS['tiny'], 'num_classes': 10}


# ------------------------------------------------------------------------ their names and their layout on disk

def songunet_names(config):
    """Our module -> theirs, from how their SongUNet names its blocks (resolution and role)."""
    R, mult, n = config['img_resolution'], config['channel_mult'], config['num_blocks']
    names = {'stem': f'enc.{R}x{R}_conv', 'out_norm': f'dec.{R}x{R}_aux_norm', 'out_conv': f'dec.{R}x{R}_aux_conv',
             'cond.embed_t.mlp.0': 'map_layer0', 'cond.embed_t.mlp.2': 'map_layer1',
             'cond.embed_s.mlp.0': 'map_layer0_s', 'cond.embed_s.mlp.2': 'map_layer1_s',
             'cond.embed_label': 'map_label', 'cond.embed_augment': 'map_augment'}
    enc, dec = [], []
    for level in range(len(mult)):
        res = R >> level
        enc += ([f'{res}x{res}_down'] if level else []) + [f'{res}x{res}_block{i}' for i in range(n)]
    for level in reversed(range(len(mult))):
        res = R >> level
        dec += [f'{res}x{res}_in0', f'{res}x{res}_in1'] if level == len(mult) - 1 else [f'{res}x{res}_up']
        dec += [f'{res}x{res}_block{i}' for i in range(n + 1)]
    names.update({f'enc.{i}': f'enc.{b}' for i, b in enumerate(enc)})
    names.update({f'dec.{i}': f'dec.{b}' for i, b in enumerate(dec)})
    return names


def songunet_state(net):
    """Their SongUNet state dict for our net: renamed, plus the 2x2 box filter buffer of each up/down conv."""
    names = songunet_names(net.config)
    state = {}
    for key, value in net.state_dict().items():
        ours = next(m for m in names if key.startswith(m + '.'))
        state[names[ours] + key[len(ours):]] = value.clone()
    for ours, theirs in names.items():
        block = net.get_submodule(ours) if ours.startswith(('enc.', 'dec.')) else None
        if block is not None and (block.up or block.down):
            for conv in ('conv0', 'skip'):
                state[f'{theirs}.{conv}.resample_filter'] = torch.full((1, 1, 2, 2), 0.25)
    return state


def _reconstruct_persistent_obj(meta):
    raise AssertionError('only the name of this function goes into the file')


_reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'


class Persistent:
    """One of their modules as persistence.py pickles it."""

    def __init__(self, class_name, state, module_src):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        return _reconstruct_persistent_obj, (dict(type='class', version=6, module_src=self.module_src,
                                                  class_name=self.class_name, state=self.state),)


def module_dict(parameters=(), buffers=(), children=(), **attributes):
    """A torch module's __dict__, as it is pickled."""
    return dict(training=False, _parameters=collections.OrderedDict(parameters),
                _buffers=collections.OrderedDict(buffers), _non_persistent_buffers_set=set(),
                _modules=collections.OrderedDict(children), **attributes)


def as_modules(flat, module_src):
    """Nest a flat state dict into their module tree: enc and dec are torch ModuleDicts, the rest records."""
    tree = {}
    for key, value in flat.items():
        *path, leaf = key.split('.')
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value

    def build(name, node):
        tensors = {k: v for k, v in node.items() if torch.is_tensor(v)}
        children = {k: build(k, v) for k, v in node.items() if not torch.is_tensor(v)}
        if name in ('enc', 'dec'):
            container = torch.nn.ModuleDict()
            container.__dict__['_modules'] = collections.OrderedDict(children)
            return container
        parameters = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in tensors.items()
                      if k != 'resample_filter'}
        buffers = {k: v for k, v in tensors.items() if k == 'resample_filter'}
        kind = 'UNetBlock' if 'x' in name else 'GroupNorm' if 'norm' in name else 'Linear' if (
            'map' in name or name == 'affine') else 'Conv2d'
        return Persistent(kind, module_dict(parameters, buffers, children, skip_scale=np.sqrt(0.5)), module_src)

    return {k: build(k, v) for k, v in tree.items()}


def authors_precond(net, module_src='', unet_class='SongUNet', **settings):
    """Their IMMPrecond around a SongUNet holding our net's weights, with the CIFAR-10 release's settings."""
    c = net.config
    unet_kwargs = dict(img_resolution=c['img_resolution'], img_channels=c['in_channels'], in_channels=c['in_channels'],
                       out_channels=c['in_channels'], label_dim=c['num_classes'], embedding_type='positional',
                       encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                       model_channels=c['model_channels'], channel_mult=c['channel_mult'], num_blocks=c['num_blocks'],
                       attn_resolutions=c['attn_resolutions'], s_embed=True, dropout=c['dropout'])
    unet = Persistent(unet_class, module_dict(children=as_modules(songunet_state(net), module_src),
                                              _init_kwargs=unet_kwargs), module_src)
    attributes = dict(img_resolution=c['img_resolution'], img_channels=c['in_channels'], label_dim=c['num_classes'],
                      use_mixed_precision=False, mixed_precision=torch.float32, noise_schedule='fm', T=0.994,
                      eps=0.006, sigma_data=0.5, f_type='simple_edm', time_scale=1000, temb_type='identity')
    attributes.update(settings)
    kwargs = dict(img_resolution=c['img_resolution'], img_channels=c['in_channels'], label_dim=c['num_classes'],
                  model_type=unet_class, **{k: v for k, v in attributes.items() if k not in (
                      'img_resolution', 'img_channels', 'label_dim', 'use_mixed_precision', 'mixed_precision')})
    return Persistent('IMMPrecond', module_dict(children={'model': unet}, _init_kwargs=kwargs, **attributes),
                      module_src)


@pytest.fixture
def write(monkeypatch):
    """write(path, obj): pickle.dump(dict(ema=obj)) as their release does, under their module names (more entries,
    as an EDM2-style snapshot's, as keyword arguments)."""
    persistence = types.ModuleType('torch_utils.persistence')
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType('torch_utils')
    package.persistence = persistence
    monkeypatch.setitem(sys.modules, 'torch_utils', package)
    monkeypatch.setitem(sys.modules, 'torch_utils.persistence', persistence)

    def write(path, obj, **more):
        with open(path, 'wb') as f:
            pickle.dump(dict(ema=obj, **more), f)
        return path
    return write


# ------------------------------------------------------------------------------------------------------- tests

def test_their_pickle_becomes_our_unet_computing_the_same_function(write, tmp_path):
    net = random_net(COND_TINY)
    path = write(tmp_path / 'cifar10.pt', authors_precond(net))
    loaded, cfg, info = authors.load_pickle(path)
    assert loaded.config == net.config and info['dtypes'] == ['torch.float32']
    x, c_t, c_s = torch.randn(3, 3, 32, 32), torch.tensor([994., 500., 20.]), torch.tensor([6., 300., 19.])
    labels = torch.tensor([0, 7, 10])  # 10: the null class
    assert torch.equal(loaded(x, c_t, c_s, labels), net(x, c_t, c_s, labels))


def test_the_settings_stored_with_their_network_become_our_imm_config(write, tmp_path):
    net = random_net(model.PRESETS['tiny'])
    _, cfg, _ = authors.load_pickle(write(tmp_path / 'a.pt', authors_precond(net)))
    assert (cfg.schedule, cfg.param, cfg.second_time, cfg.eps, cfg.T, cfg.sigma_d) == \
        ('fm', 'simple_edm', 's', 0.006, 0.994, 0.5)
    _, cfg, _ = authors.load_pickle(write(tmp_path / 'b.pt', authors_precond(
        net, noise_schedule='vp_cosine', f_type='identity', temb_type='stride', T=0.996)))
    assert (cfg.schedule, cfg.param, cfg.second_time, cfg.T) == ('cosine', 'identity', 't-s', 0.996)


def test_settings_we_cannot_represent_are_refused_by_name(write, tmp_path):
    net = random_net(model.PRESETS['tiny'])
    with pytest.raises(UsageError, match="time_scale=250"):
        authors.load_pickle(write(tmp_path / 'a.pt', authors_precond(net, time_scale=250)))


def omegaconf_list(values, monkeypatch):
    """A list as omegaconf pickles a ListConfig (what a hydra config's list setting stays in their kwargs):
    the container's state holds '_content', a list of value nodes each holding '_val'."""
    classes = {}
    monkeypatch.setitem(sys.modules, 'omegaconf', types.ModuleType('omegaconf'))
    for module, name in [('omegaconf.listconfig', 'ListConfig'), ('omegaconf.nodes', 'AnyNode')]:
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
        classes[name] = type(name, (), {'__module__': module})
        setattr(sys.modules[module], name, classes[name])
        setattr(sys.modules['omegaconf'], module.split('.')[1], sys.modules[module])
    container = classes['ListConfig']()
    container.__dict__.update(_metadata=None, _parent=None, _content=[classes['AnyNode']() for _ in values])
    for node, value in zip(container._content, values):
        node.__dict__.update(_metadata=None, _parent=container, _flags_cache=None, _val=value)
    return container


def test_settings_held_as_omegaconf_lists_are_read_as_lists(write, tmp_path, monkeypatch):
    net = random_net(model.PRESETS['tiny'])
    precond = authors_precond(net)
    unet_kwargs = precond.state['_modules']['model'].state['_init_kwargs']
    unet_kwargs['channel_mult'] = omegaconf_list(net.config['channel_mult'], monkeypatch)
    loaded, _, info = authors.load_pickle(write(tmp_path / 'a.pt', precond))
    assert loaded.config == net.config and info['unet_kwargs']['channel_mult'] == [1, 2]


def test_the_source_embedded_in_their_file_is_never_run(write, tmp_path):
    marker = tmp_path / 'written_by_the_file'
    payload = f'open({str(marker)!r}, "w").write("ran")\n'
    net = random_net(model.PRESETS['tiny'])
    authors.load_pickle(write(tmp_path / 'a.pt', authors_precond(net, module_src=payload)))
    with pytest.raises(UsageError, match="expected dict\\(ema=IMMPrecond\\).*found Payload"):
        authors.load_pickle(write(tmp_path / 'b.pt', Persistent('Payload', module_dict(), payload)))
    assert not marker.exists()


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_global_a_network_does_not_need_is_refused(write, tmp_path):
    marker = tmp_path / 'written_by_the_file'
    path = write(tmp_path / 'a.pt', _System(f'touch {marker}'))
    with pytest.raises(UsageError, match=r'asks for \w+\.system.*refused'):
        authors.load_pickle(path)
    assert not marker.exists()


def test_a_record_whose_state_is_not_a_module_is_refused(write, tmp_path):
    with pytest.raises(UsageError, match="persistent record that is not a saved module.*'IMMPrecond'"):
        authors.load_pickle(write(tmp_path / 'a.pt', Persistent('IMMPrecond', {'x': 1}, '')))


def test_another_network_type_is_refused_by_name(write, tmp_path):
    net = random_net(model.PRESETS['tiny'])
    with pytest.raises(UsageError, match='network is their DhariwalUNet; only their SongUNet'):
        authors.load_pickle(write(tmp_path / 'a.pt', authors_precond(net, unet_class='DhariwalUNet')))


def test_the_name_map_round_trips_on_the_paper_preset():
    net = model.build_net(model.PRESETS['ddpmpp'])
    assert sum(p.numel() for p in net.parameters()) == 56_061_443
    ours = net.state_dict()
    converted = authors.convert_unet_state(songunet_state(net))
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)


def test_a_resampling_filter_other_than_the_box_is_refused():
    state = songunet_state(model.build_net(model.PRESETS['tiny']))
    f = torch.tensor([1., 3, 3, 1])
    state['enc.16x16_down.conv0.resample_filter'] = f.outer(f)[None, None] / 64  # NCSN++'s filter
    with pytest.raises(UsageError, match='enc.16x16_down.conv0.resample_filter.*not the 2x2 box'):
        authors.convert_unet_state(state)


# ---------------------------------------------------- their file through our scripts: sample.py and --init-from

UNCOND_TINY = {**model.PRESETS['tiny'], 'img_resolution': 8, 'attn_resolutions': [4]}


def test_sample_py_draws_from_their_file_what_their_network_gives(write, tmp_path):
    import imm
    import sample as sample_script
    from data import decode
    net = random_net(UNCOND_TINY)
    path = write(tmp_path / 'cifar10.pt', authors_precond(net))
    out = tmp_path / 'samples.npz'
    sample_script.main(['--ckpt', str(path), '--steps', '2', '--n', '3', '--out', str(out), '--device', 'cpu'])
    with np.load(out) as f:
        images = f['arr_0']
    noise, _ = sample_script.draw_inputs(torch.Generator().manual_seed(0), 3, [3, 8, 8], 0, 0.5)
    cfg = imm.IMMConfig()                                    # their CIFAR-10 settings are our defaults
    expected = decode(imm.sample(net, noise, imm.sampling_times(2, cfg), cfg), 'image')
    assert images.shape == (3, 8, 8, 3) and np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_raw_weights_are_refused_for_their_file(write, tmp_path, capsys):
    import sample as sample_script
    path = write(tmp_path / 'cifar10.pt', authors_precond(random_net(UNCOND_TINY)))
    with pytest.raises(SystemExit):
        sample_script.main(['--ckpt', str(path), '--raw', '--device', 'cpu'])
    assert "only the EMA weights" in capsys.readouterr().err


def test_training_can_start_from_their_weights(write, tmp_path):
    import train
    net = random_net(UNCOND_TINY)
    path = write(tmp_path / 'cifar10.pt', authors_precond(net))
    np.save(tmp_path / 'images.npy', np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    flags = ['--dataset', str(tmp_path / 'images.npy'), '--iters', '1', '--batch', '4', '--lr', '1e-30',
             '--sample-every', '0', '--device', 'cpu', '--init-from', str(path)]
    assert train.main(flags + ['--out', str(tmp_path / 'run')]) == 0
    trained = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert trained['net_config'] == net.config and trained['step'] == 1
    assert all(torch.allclose(trained['net'][k], v, atol=1e-6) for k, v in net.state_dict().items())
    with pytest.raises(UsageError, match=r"does not fit this run \(classes \(--cond\): the network's 0, this run's 2"):
        np.savez(tmp_path / 'labelled.npz', x=np.zeros((8, 8, 8, 3), np.uint8), labels=np.arange(8) % 2)
        train.main(flags[2:] + ['--dataset', str(tmp_path / 'labelled.npz'), '--cond', '--out', str(tmp_path / 'x')])


# ------------------------------------------------------------------- their ImageNet release: a DiT in IMMPrecond

DIT_TINY = {**model.PRESETS['dit-s2'], 'img_resolution': 8, 'hidden_size': 32, 'depth': 2, 'num_heads': 4,
            'num_classes': 10}
_DIT_NAMES = [('patch_embed.', 'x_embedder.proj.'), ('embed_t.', 't_embedder.'), ('embed_s.', 's_embedder.'),
              ('embed_label.', 'y_embedder.embedding_table.'), ('out_modulation.', 'final_layer.adaLN_modulation.1.'),
              ('out.', 'final_layer.linear.')]
_DIT_BLOCK_NAMES = {'qkv': 'attn.qkv', 'proj': 'attn.proj', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2',
                    'modulation': 'adaLN_modulation.1'}


def dit_state(state):
    """Their DiT state dict (training/dit.py's names) for our DiT's state dict."""
    theirs = {}
    for key, value in state.items():
        for ours, name in _DIT_NAMES:
            key = name + key[len(ours):] if key.startswith(ours) else key
        if key.startswith('blocks.'):
            _, i, layer, leaf = key.split('.')
            key = f'blocks.{i}.{_DIT_BLOCK_NAMES[layer]}.{leaf}'
        theirs[key] = value
    return theirs


@pytest.fixture
def timm(monkeypatch):
    """timm's PatchEmbed, Attention and Mlp, under their module names: plain torch modules pickled by name."""
    classes = {}
    for package in ('timm', 'timm.layers'):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for module, name in [('timm.layers.patch_embed', 'PatchEmbed'), ('timm.layers.attention', 'Attention'),
                         ('timm.layers.mlp', 'Mlp')]:
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
        classes[name] = type(name, (torch.nn.Module,), {'__module__': module})
        setattr(sys.modules[module], name, classes[name])

    def make(name, children, **attributes):
        layer = classes[name]()
        for child_name, child in children.items():
            layer.add_module(child_name, child)
        layer.__dict__.update(attributes)
        return layer
    return make


def _linear(state, prefix):
    w = state[prefix + '.weight']
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    layer.weight, layer.bias = (torch.nn.Parameter(state[f'{prefix}.{k}'], requires_grad=False)
                                for k in ('weight', 'bias'))
    return layer


def authors_dit_precond(net, timm, class_name='DiT', approximate='tanh', **settings):
    """Their IMMPrecond around a DiT holding our net's weights, laid out as their training/dit.py builds it: their own
    modules as persistent records, timm's and torch's as plain pickled modules."""
    c, state = net.config, dit_state({k: v.clone() for k, v in net.state_dict().items()})
    H, p = c['hidden_size'], c['patch_size']
    norm = lambda: torch.nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
    sequential = lambda prefix: torch.nn.Sequential(torch.nn.SiLU(), _linear(state, prefix))

    def embedder(name):
        mlp = torch.nn.Sequential(_linear(state, f'{name}.mlp.0'), torch.nn.SiLU(), _linear(state, f'{name}.mlp.2'))
        attributes = dict(use_mlp=True, hidden_size=H, frequency_embedding_size=256, embedding_type='positional')
        return Persistent('TimestepEmbedder', module_dict(children={'mlp': mlp}, **attributes), '')

    def block(i):
        b = f'blocks.{i}'
        attn = timm('Attention', dict(qkv=_linear(state, f'{b}.attn.qkv'), q_norm=torch.nn.Identity(),
                                      k_norm=torch.nn.Identity(), attn_drop=torch.nn.Dropout(0.0),
                                      proj=_linear(state, f'{b}.attn.proj'), proj_drop=torch.nn.Dropout(0.0)),
                    num_heads=c['num_heads'], fused_attn=True)
        mlp = timm('Mlp', dict(fc1=_linear(state, f'{b}.mlp.fc1'), act=torch.nn.GELU(approximate=approximate),
                               drop1=torch.nn.Dropout(0.0), norm=torch.nn.Identity(),
                               fc2=_linear(state, f'{b}.mlp.fc2'), drop2=torch.nn.Dropout(0.0)))
        children = dict(norm1=norm(), attn=attn, norm2=norm(), mlp=mlp,
                        adaLN_modulation=sequential(f'{b}.adaLN_modulation.1'))
        return Persistent('DiTBlock', module_dict(children=children, skip_linear=None), '')

    blocks = torch.nn.ModuleList()
    blocks.__dict__['_modules'] = collections.OrderedDict((str(i), block(i)) for i in range(c['depth']))
    proj = torch.nn.Conv2d(c['in_channels'], H, p, stride=p)
    proj.weight, proj.bias = (torch.nn.Parameter(state[f'x_embedder.proj.{k}'], requires_grad=False)
                              for k in ('weight', 'bias'))
    label_table = torch.nn.Embedding.from_pretrained(state['y_embedder.embedding_table.weight'])
    final = Persistent('FinalLayer', module_dict(children=dict(
        norm_final=norm(), linear=_linear(state, 'final_layer.linear'),
        adaLN_modulation=sequential('final_layer.adaLN_modulation.1'))), '')
    children = dict(s_embedder=embedder('s_embedder'), x_embedder=timm('PatchEmbed', {'proj': proj}, patch_size=(p, p)),
                    t_embedder=embedder('t_embedder'),
                    y_embedder=Persistent('LabelEmbedder', module_dict(children={'embedding_table': label_table},
                                                                       num_classes=c['num_classes'] + 1,
                                                                       dropout_prob=0.0), ''),
                    blocks=blocks, final_layer=final)
    kwargs = dict(img_resolution=c['img_resolution'], img_channels=c['in_channels'], in_channels=c['in_channels'],
                  out_channels=c['in_channels'], label_dim=c['num_classes'], s_embed=True, num_classes=c['num_classes'])
    dit = Persistent(class_name, module_dict(
        parameters={'pos_embed': torch.nn.Parameter(state['pos_embed'], requires_grad=False)}, children=children,
        in_channels=c['in_channels'], out_channels=c['in_channels'], patch_size=p, num_heads=c['num_heads'],
        skip=False, s_embed=True, _init_kwargs=kwargs), '')
    attributes = dict(img_resolution=c['img_resolution'], img_channels=c['in_channels'], label_dim=c['num_classes'],
                      use_mixed_precision=True, mixed_precision=torch.float16, noise_schedule='fm', T=0.994, eps=0.0,
                      sigma_data=0.5, f_type='euler_fm', time_scale=1000.0, temb_type='stride')
    attributes.update(settings)
    attributes = {k: v for k, v in attributes.items() if v is not None}
    precond_kwargs = dict(img_resolution=c['img_resolution'], img_channels=c['in_channels'],
                          label_dim=c['num_classes'], model_type=class_name, mixed_precision='fp16')
    return Persistent('IMMPrecond', module_dict(children={'model': dit}, _init_kwargs=precond_kwargs, **attributes), '')


def random_dit(config=DIT_TINY, seed=0):
    """Our DiT with every weight random, the zero-initialised ones included."""
    return random_net(config, seed)


def test_their_dit_pickle_becomes_our_dit_computing_the_same_function(write, timm, tmp_path):
    net = random_dit()
    loaded, cfg, info = authors.load_pickle(write(tmp_path / 'imagenet.pkl', authors_dit_precond(net, timm)))
    assert loaded.config == net.config and info['network'] == 'IMMPrecond(DiT)' and info['dtypes'] == ['torch.float32']
    assert (cfg.schedule, cfg.param, cfg.eps, cfg.T, cfg.sigma_d) == ('fm', 'euler_fm', 0.0, 0.994, 0.5)
    x, c_t, c_s = torch.randn(3, 4, 8, 8), torch.tensor([994., 500., 20.]), torch.tensor([6., 300., 19.])
    labels = torch.tensor([0, 7, 10])  # 10: the null class
    assert torch.equal(loaded(x, c_t, c_s, labels), net(x, c_t, c_s, labels))


@pytest.mark.parametrize('temb_type, second_time', [('stride', 't-s'), ('identity', 's')])
def test_both_second_time_conditions_of_their_imagenet_files_load(write, timm, tmp_path, temb_type, second_time):
    """imagenet256_ts_a2.pkl: t - s ('stride'); imagenet256_s_a1.pkl: s ('identity'), as stored with the network."""
    path = write(tmp_path / 'a.pkl', authors_dit_precond(random_dit(), timm, 'DiT_XL_2', temb_type=temb_type))
    _, cfg, info = authors.load_pickle(path)
    assert cfg.second_time == second_time and info['stored_temb_type'] == temb_type


def test_without_a_stored_second_time_a_dit_file_needs_it_named(write, timm, tmp_path):
    path = write(tmp_path / 'a.pkl', authors_dit_precond(random_dit(), timm, temb_type=None))
    with pytest.raises(UsageError, match="stores no temb_type.*pass second_time='t-s'"):
        authors.load_pickle(path)
    assert authors.load_pickle(path, second_time='s')[1].second_time == 's'


def test_a_second_time_given_overrides_the_stored_one_with_a_warning(write, timm, tmp_path):
    path = write(tmp_path / 'a.pkl', authors_dit_precond(random_dit(), timm, temb_type='stride'))
    with pytest.warns(UserWarning, match="stores temb_type='stride'; using second_time='s'"):
        assert authors.load_pickle(path, second_time='s')[1].second_time == 's'


def test_label_table_rows_past_the_null_row_are_dropped(write, timm, tmp_path):
    """Their LabelEmbedder adds a row when built with label dropout; their forward never reaches past the null row."""
    net = random_dit()
    precond = authors_dit_precond(net, timm)
    label_embedder = precond.state['_modules']['model'].state['_modules']['y_embedder']
    table = label_embedder.state['_modules']['embedding_table']
    label_embedder.state['_modules']['embedding_table'] = torch.nn.Embedding.from_pretrained(
        torch.cat([table.weight, torch.randn(1, table.weight.shape[1])]))
    loaded, _, _ = authors.load_pickle(write(tmp_path / 'a.pkl', precond))
    assert torch.equal(loaded.embed_label.weight, net.embed_label.weight)


def test_the_dit_name_map_round_trips_on_the_xl2_preset():
    with torch.device('meta'):
        ours = model.build_net(model.PRESETS['dit-xl2']).state_dict()
    converted = authors.convert_dit_state(dit_state(ours))
    assert list(converted) == list(ours) and all(converted[k].shape == v.shape for k, v in ours.items())
    assert 'blocks.27.attn.qkv.weight' in dit_state(ours)
    assert len(ours) == 12 + 28 * 10 + 4                    # patches, positions and embeddings; blocks; final layer


def test_a_dit_weight_ours_does_not_have_is_refused_by_name():
    state = dit_state(random_dit().state_dict())
    state['blocks.0.attn.q_norm.weight'] = torch.ones(8)                   # their qk_norm=True
    with pytest.raises(UsageError, match="'blocks.0.attn.q_norm.weight' that our DiT does not have"):
        authors.convert_dit_state(state)


def test_a_dit_with_another_activation_is_refused_by_name(write, timm, tmp_path):
    path = write(tmp_path / 'a.pkl', authors_dit_precond(random_dit(), timm, approximate='none'))
    with pytest.raises(UsageError, match=r"blocks.0.mlp.act=\('GELU', 'none'\)"):
        authors.load_pickle(path)


def test_the_latent_encoder_settings_are_returned_when_the_file_holds_them(write, timm, tmp_path):
    net = random_dit()
    _, _, info = authors.load_pickle(write(tmp_path / 'a.pkl', authors_dit_precond(net, timm)))
    assert info['encoder'] is None and 'sd-vae-ft-ema' in info['encoder_note']
    std = np.array([4.85503674, 5.31922414, 3.93725398, 3.9870003], np.float32)
    encoder = Persistent('StabilityVAEEncoder', dict(vae_name='stabilityai/sd-vae-ft-ema', scale=np.float32(0.5) / std,
                                                     bias=np.zeros(4, np.float32), batch_size=8, _vae=None,
                                                     dtype=torch.float16), '')
    _, _, info = authors.load_pickle(write(tmp_path / 'b.pkl', authors_dit_precond(net, timm),
                                                      encoder=encoder))
    assert info['encoder']['vae_name'] == 'stabilityai/sd-vae-ft-ema' and info['encoder']['dtype'] == 'torch.float16'
    assert np.allclose(info['encoder']['scale'], 0.5 / std) and info['encoder_note'] is None


def test_their_imagenet_file_samples_to_decoded_images_with_guidance(write, timm, tmp_path, tiny_vae):  # noqa: F811 (the fixture)
    import sample as sample_script
    path = write(tmp_path / 'imagenet256_ts_a2.pkl', authors_dit_precond(random_dit(), timm))
    _, _, ckpt = checkpoint.load_for_sampling(str(path))
    assert ckpt['data']['kind'] == 'latent' and ckpt['data']['scale'] == 0.5     # their latent normalisation
    assert ckpt['data']['mean'][0] == 0.86488 and ckpt['data']['vae'] == 'stabilityai/sd-vae-ft-ema'
    out = tmp_path / 'samples.npz'
    sample_script.main(['--ckpt', str(path), '--steps', '2', '--guidance', '1.5', '--class', '7', '--n', '2',
                        '--vae', tiny_vae, '--out', str(out), '--device', 'cpu'])
    with np.load(out) as f:
        assert f['arr_0'].dtype == np.uint8 and f['arr_0'].shape == (2, 16, 16, 3) and f['arr_1'].tolist() == [7, 7]
