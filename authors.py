"""
The authors' released networks (lumalabs/imm on the Hugging Face Hub: cifar10.pt, imagenet256_ts_a2.pkl,
imagenet256_s_a1.pkl), read as data: nothing in the file is ever run.

    import authors
    net, cfg, info = authors.load_pickle('cifar10.pt')               # model.UNet with their EMA weights, IMMConfig
    net, cfg, info = authors.load_pickle('imagenet256_s_a1.pkl', second_time='s')   # their DiT-XL/2
    net, cfg, ckpt = authors.as_checkpoint('cifar10.pt')             # what sample.py reads of a checkpoint

Their file is pickle.dump(dict(ema=net)): net is an IMMPrecond (the one-step map f_{s,t} of Sec. 4.2, docs/method.md
section 3) holding a SongUNet (EDM's DDPM++ with a second time embedding) for CIFAR-10, or a DiT (DiT-XL/2 for
ImageNet, made of timm's PatchEmbed, Attention and Mlp and plain torch layers) with a second time embedding. Each
of their own modules is saved by EDM's torch_utils/persistence.py as a record {type: 'class', version, module_src,
class_name, state}, state being the module's __dict__ (parameters, buffers, submodules, attributes, and the
constructor's keyword arguments as _init_kwargs); torch's and timm's modules are pickled plainly (class name, then
__dict__). A plain pickle.load would exec module_src. Here a restricted unpickler turns each record into data
(_Record) and accepts nothing but plain containers, numbers, tensors rebuilt by torch's own functions, and those
records; the network is then built from our code (model.UNet or model.DiT, imm.IMMConfig) and given the renamed
weights. Other entries of the dict (an EDM2-style snapshot may hold the latent encoder's settings) are read as
data too. docs/walkthrough.md compares the outputs with the authors' own code.
"""
import collections
import io
import pickle
import re
import typing
import warnings

import numpy as np
import torch

from data import SIGMA_D
from imm import IMMConfig
from model import build_net
from util import UsageError

# The release on the Hugging Face Hub, as --ckpt and --init-from name it (checkpoint.hub_file downloads it once).
RELEASE = ('hf://lumaai/imm/cifar10.pt', 'hf://lumaai/imm/imagenet256_ts_a2.pkl',
           'hf://lumaai/imm/imagenet256_s_a1.pkl')
DEFAULT_VAE = 'stabilityai/sd-vae-ft-ema'  # the VAE of their ImageNet model (configs/im256_generate_images.yaml)
# Their per-channel statistics of sd-vae-ft-ema's ImageNet latents (the same config): z = (raw - mean) / std * 0.5.
IMAGENET_LATENT_MEAN = [0.86488, -0.27787343, 0.21616915, 0.3738409]
IMAGENET_LATENT_STD = [4.85503674, 5.31922414, 3.93725398, 3.9870003]


def is_pickle(path):
    """True for a plain pickle (their release); torch.save writes a zip file ('PK'), a pickle starts with 0x80."""
    with open(path, 'rb') as f:
        return f.read(1) == b'\x80'


def as_checkpoint(path, second_time=None):
    """(net, cfg, ckpt) for sample.py: the network of load_pickle and a checkpoint dict made up of what sample.py
    reads of one: data kind and shape (their ImageNet model works on SD-VAE latents, normalised as their release
    does), loss 'imm', step 'released', and 'authors', the info load_pickle returns."""
    net, cfg, info = load_pickle(path, second_time)
    c = net.config
    data = {'name': "the authors' release", 'kind': 'image', 'num_classes': c['num_classes'],
            'shape': [c['in_channels'], c['img_resolution'], c['img_resolution']], 'mean': None, 'std': None}
    if c['arch'] == 'dit':
        data.update(kind='latent', mean=IMAGENET_LATENT_MEAN, std=IMAGENET_LATENT_STD, scale=SIGMA_D, vae=DEFAULT_VAE)
    return net, cfg, {'data': data, 'args': {'loss': 'imm'}, 'step': 'released', 'authors': info}


class _Record:
    """A module of the file, read as data: its class name and its __dict__ (nothing of its code)."""

    def __init__(self, class_name, state=None):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):  # pickle's BUILD for a plain torch container (ModuleDict)
        self.state = state


def _is_module(record):
    return isinstance(record, _Record) and isinstance(record.state, dict) and \
        isinstance(record.state.get('_parameters'), dict) and isinstance(record.state.get('_modules'), dict)


def _not_a_module(record):
    state = record.state
    return UsageError(f'the file holds a persistent record that is not a saved module (class {record.class_name!r}, '
                      f'state keys {sorted(state) if isinstance(state, dict) else state!r}); refused')


def _persistent_record(meta):
    """Stands in for persistence._reconstruct_persistent_obj: keeps the record's state, never looks at its source.
    A record that is not a module (their latent encoder) is kept as data; only our loader's reads of it decide."""
    meta = meta if isinstance(meta, dict) else {}
    record = _Record(meta.get('class_name'), meta.get('state'))
    if not (meta.get('type') == 'class' and isinstance(record.class_name, str) and isinstance(record.state, dict)):
        raise _not_a_module(record)
    return record


def _torch_container(class_name):  # pickle makes it with cls.__new__ (NEWOBJ), then BUILD gives its __dict__
    return type(class_name, (_Record,), {'class_name': class_name, 'state': None})


def _reconstructor(cls, base, state):  # copyreg._reconstructor (protocols 0 and 1), only for our containers
    if not (isinstance(cls, type) and issubclass(cls, _Record)):
        raise UsageError(f'the file rebuilds an object of {cls!r}; refused')
    return cls.__new__(cls)


class _OmegaConf(_Record):
    """An omegaconf container or node (their settings come from hydra configs), kept as its state."""
    class_name = 'omegaconf'


def _plain(value):
    """A setting as a plain value: omegaconf's ListConfig -> list, DictConfig -> dict, value nodes -> their value."""
    if isinstance(value, _OmegaConf):
        state = value.state if isinstance(value.state, dict) else {}
        value = state['_val'] if '_val' in state else state.get('_content')
    if isinstance(value, _NumpyArray):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _storage_from_bytes(b):  # torch.storage._load_from_bytes, with torch's own restricted loader
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # TypedStorage is deprecated
        return torch.load(io.BytesIO(b), map_location='cpu', weights_only=True)


class _NumpyArray:
    """A numpy array of numbers (their encoder's scale and bias), rebuilt from its raw bytes: numpy's
    _reconstruct makes an empty one, BUILD gives (version, shape, dtype, is_fortran, bytes)."""

    def __setstate__(self, state):
        _, shape, dtype, fortran, data = state
        if not (isinstance(dtype, np.dtype) and dtype.kind in 'biuf' and isinstance(data, bytes) and not fortran):
            raise UsageError(f'the file holds a numpy array of dtype {dtype!r}; only numbers are accepted')
        self.value = np.frombuffer(data, dtype).reshape(shape).tolist()


def _numpy_reconstruct(cls, shape, typecode):
    if cls is not _NumpyArray:
        raise UsageError(f'the file rebuilds a numpy object of {cls!r}; refused')
    return _NumpyArray()


def _numpy_scalar(dtype, data):  # numpy scalars (their skip_scale = np.sqrt(0.5)): numbers only
    if not (isinstance(dtype, np.dtype) and dtype.kind in 'biuf' and isinstance(data, bytes)):
        raise UsageError(f'the file holds a numpy scalar of dtype {dtype!r}; only numbers are accepted')
    return np.frombuffer(data, dtype)[0].item()


_AUTHORS_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_record,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset, ('builtins', 'object'): object,
    ('copyreg', '_reconstructor'): _reconstructor,
    ('dnnlib.util', 'EasyDict'): dict,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar, ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct, ('numpy', 'ndarray'): _NumpyArray,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
    # Plain torch layers and timm's (their DiT), each read as its __dict__; timm's PatchEmbed holds an enum member.
    **{(f'torch.nn.modules.{module}', name): _torch_container(name) for module, name in [
        ('container', 'ModuleDict'), ('container', 'ModuleList'), ('container', 'Sequential'), ('linear', 'Linear'),
        ('linear', 'Identity'), ('conv', 'Conv2d'), ('normalization', 'LayerNorm'), ('activation', 'SiLU'),
        ('activation', 'GELU'), ('sparse', 'Embedding'), ('dropout', 'Dropout')]},
    **{(module, name): _torch_container(name) for module, name in [  # where timm versions keep them
        ('timm.layers.patch_embed', 'PatchEmbed'), ('timm.models.layers.patch_embed', 'PatchEmbed'),
        ('timm.models.vision_transformer', 'Attention'), ('timm.layers.attention', 'Attention'),
        ('timm.layers.mlp', 'Mlp'), ('timm.models.layers.mlp', 'Mlp')]},
    ('timm.layers.format', 'Format'): str,
    # omegaconf objects in _init_kwargs (a list setting passed on from a hydra config stays a ListConfig), with the
    # plain types and the typing.Any their metadata names.
    **{(module, name): _OmegaConf for module, name in [
        ('omegaconf.listconfig', 'ListConfig'), ('omegaconf.dictconfig', 'DictConfig'),
        ('omegaconf.base', 'ContainerMetadata'), ('omegaconf.base', 'Metadata'),
        *[('omegaconf.nodes', f'{kind}Node') for kind in ('Any', 'Integer', 'Float', 'String', 'Boolean')]]},
    ('collections', 'defaultdict'): collections.defaultdict, ('typing', 'Any'): typing.Any,
    **{('builtins', t.__name__): t for t in (dict, list, tuple, int, float, str, bool)},
}


class _AuthorsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _AUTHORS_GLOBALS:
            return _AUTHORS_GLOBALS[module, name]
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UsageError(f'the file asks for {module}.{name}, which a saved network does not need; refused '
                         f'(nothing from the file was run)')

    def persistent_load(self, pid):
        raise UsageError(f'the file holds a persistent id {str(pid)[:60]!r}, which their pickles do not; refused')


def _module_state(record, prefix=''):
    """The state dict (their names) of a record tree: parameters, persistent buffers, then submodules."""
    if not _is_module(record):
        raise UsageError(f'{prefix or "the network"} is a {type(record).__name__}, not a saved module; refused')
    state, out = record.state, {}
    parts = [state.get(k, {}) for k in ('_parameters', '_buffers', '_modules')]
    if not all(isinstance(part, dict) for part in parts):
        raise UsageError(f'{prefix or "the network"} ({record.class_name}) has no parameter, buffer and module '
                         f'tables; refused')
    skip = state.get('_non_persistent_buffers_set', set())
    for name, value in [*state.get('_parameters', {}).items(), *state.get('_buffers', {}).items()]:
        if value is not None and name not in skip:
            if not torch.is_tensor(value):
                raise UsageError(f'{prefix}{name} is a {type(value).__name__}, not a tensor; refused')
            out[prefix + name] = value
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            out.update(_module_state(child, f'{prefix}{name}.'))
    return out


_AUTHORS_MAPPING_NAMES = {'map_layer0': 'cond.embed_t.mlp.0', 'map_layer1': 'cond.embed_t.mlp.2',
                          'map_layer0_s': 'cond.embed_s.mlp.0', 'map_layer1_s': 'cond.embed_s.mlp.2',
                          'map_label': 'cond.embed_label', 'map_augment': 'cond.embed_augment'}


def _our_block_names(blocks):
    """{(part, their block): our module} for a set of their (part, block) names such as ('enc', '16x16_block0').
    Their blocks are named by resolution and role; ours are numbered in the order the network runs them."""
    ends = {'enc': {'conv': 'stem'}, 'dec': {'aux_norm': 'out_norm', 'aux_conv': 'out_conv'}}

    def running_order(part, block):  # the encoder goes down in resolution, the decoder up
        res, role = re.fullmatch(r'(\d+)x\d+_(\w+)', block).groups()
        rank = {'down': 0, 'in0': 0, 'in1': 1, 'up': 0}.get(role)
        return (-int(res) if part == 'enc' else int(res)), (2 + int(role[5:]) if rank is None else rank)

    names = {}
    for part in ('enc', 'dec'):
        mine = [b for p, b in blocks if p == part]
        for b in mine:
            if b.split('_', 1)[1] in ends[part]:
                names[part, b] = ends[part][b.split('_', 1)[1]]
        running = sorted((b for b in mine if (part, b) not in names), key=lambda b: running_order(part, b))
        names.update({(part, b): f'{part}.{i}' for i, b in enumerate(running)})
    return names


def convert_unet_state(state):
    """Their SongUNet state dict -> ours (model.UNet). Names: map_layer0/1 -> cond.embed_t.mlp.0/2 (and _s ->
    embed_s), map_label/map_augment -> cond.embed_label/embed_augment, enc.32x32_conv -> stem, the other enc and dec
    blocks -> enc.i / dec.i in running order, dec.32x32_aux_norm/aux_conv -> out_norm/out_conv. Inside a block
    the names are the same. Their up/down convs carry a resample_filter buffer: it must be the 2x2 box, which is
    our nearest upsampling and average pooling, and is dropped."""
    blocks = set()
    for key in state:
        part, _, rest = key.partition('.')
        block = rest.split('.')[0]
        if part in ('enc', 'dec') and re.fullmatch(r'\d+x\d+_(conv|down|up|in0|in1|block\d+|aux_norm|aux_conv)', block):
            blocks.add((part, block))
        elif part not in _AUTHORS_MAPPING_NAMES:
            raise UsageError(f"the authors' network has a layer {key!r} that our UNet does not have (only EDM's "
                             f"standard DDPM++ encoder and decoder are supported)")
    ours = _our_block_names(blocks)
    converted = {}
    for key, value in state.items():
        part, _, rest = key.partition('.')
        if rest.endswith('.resample_filter'):
            if not torch.equal(value.double(), torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64)):
                raise UsageError(f'{key} is {value.flatten().tolist()}, not the 2x2 box filter [1, 1] of DDPM++')
        elif part in _AUTHORS_MAPPING_NAMES:
            converted[f'{_AUTHORS_MAPPING_NAMES[part]}.{rest}'] = value
        else:
            block, _, inside = rest.partition('.')
            converted[f'{ours[part, block]}.{inside}'] = value
    return converted


# Their SongUNet's constructor defaults, for settings a file's _init_kwargs leave out, and the settings that make
# it DDPM++ exactly as our UNet computes it (these defaults are also theirs).
_SONGUNET_DEFAULTS = dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4,
                          attn_resolutions=[16], dropout=0.10, label_dim=0)
_SONGUNET_REQUIRED = dict(embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                          decoder_type='standard', resample_filter=[1, 1], s_embed=True, channel_mult_emb=4)
_SCHEDULES = {'fm': 'fm', 'vp_cosine': 'cosine'}
_SECOND_TIMES = {'identity': 's', 'stride': 't-s'}


def _refuse_unless(ok, what, value, accepted):
    if not ok:
        raise UsageError(f"the authors' network has {what}={value!r}, which we cannot represent; accepted: {accepted}")


def _authors_imm_config(precond, second_time=None, network='SongUNet'):
    """IMMConfig from the attributes their IMMPrecond.forward uses (noise_schedule, f_type, temb_type, ...).
    second_time ('s' | 't-s') overrides the file's temb_type; a DiT file without a stored temb_type needs it (their
    ImageNet config sets temb_type, and their sampler takes it from the config, not from the file)."""
    defaults = dict(noise_schedule='fm', sigma_data=0.5, f_type='euler_fm', T=0.994, eps=0.0,
                    time_scale=1000.0)  # their IMMPrecond's
    attributes = {k: _plain(v) for k, v in precond.state.items() if not k.startswith('_')}
    a = {**defaults, **_plain(precond.state.get('_init_kwargs', {})), **attributes}
    if 'temb_type' not in a and network == 'SongUNet':
        a['temb_type'] = 'identity'                           # their default, and the CIFAR-10 config's
    if second_time is not None:
        if second_time not in _SECOND_TIMES.values():
            raise UsageError(f"second_time={second_time!r} is not valid; accepted: 's', 't-s'")
        if 'temb_type' in a and _SECOND_TIMES.get(a['temb_type']) != second_time:
            warnings.warn(f"the authors' file stores temb_type={a['temb_type']!r}; using second_time={second_time!r} "
                          f"as asked")
        a['temb_type'] = {v: k for k, v in _SECOND_TIMES.items()}[second_time]
    if 'temb_type' not in a:
        raise UsageError("the authors' DiT file stores no temb_type (its second time condition); pass second_time="
                         "'t-s' (imagenet256_ts_a2.pkl) or 's' (imagenet256_s_a1.pkl), as their README says")
    _refuse_unless(a['noise_schedule'] in _SCHEDULES, 'noise_schedule', a['noise_schedule'], ', '.join(_SCHEDULES))
    _refuse_unless(a['temb_type'] in _SECOND_TIMES, 'temb_type', a['temb_type'], ', '.join(_SECOND_TIMES))
    _refuse_unless(a['time_scale'] == 1000, 'time_scale', a['time_scale'], '1000 (c_noise = 1000 t, docs/method.md section 3)')
    try:
        return IMMConfig(schedule=_SCHEDULES[a['noise_schedule']], param=a['f_type'], eps=float(a['eps']),
                         T=float(a['T']), sigma_d=float(a['sigma_data']), second_time=_SECOND_TIMES[a['temb_type']])
    except (ValueError, TypeError) as e:
        raise UsageError(f"the authors' network has settings we cannot represent: {e}") from None


def _authors_net_config(unet):
    """Our model.UNet config from the keyword arguments their SongUNet was built with."""
    k = {**_SONGUNET_DEFAULTS, **_SONGUNET_REQUIRED, **_plain(unet.state.get('_init_kwargs', {}))}
    missing = [name for name in ('img_resolution', 'in_channels', 'out_channels') if name not in k]
    _refuse_unless(not missing, 'no setting for', missing, 'img_resolution, in_channels and out_channels stored')
    for name, value in _SONGUNET_REQUIRED.items():
        _refuse_unless((list(k[name]) if isinstance(value, list) else k[name]) == value, name, k[name], repr(value))
    _refuse_unless(k['in_channels'] == k['out_channels'], 'out_channels', k['out_channels'],
                   f"in_channels ({k['in_channels']})")
    return dict(arch='unet', img_resolution=k['img_resolution'], in_channels=k['in_channels'],
                model_channels=k['model_channels'], channel_mult=list(k['channel_mult']),
                num_blocks=k['num_blocks'], attn_resolutions=list(k['attn_resolutions']), dropout=k['dropout'],
                num_classes=k['label_dim'], augment_dim=k['augment_dim'])


# Their DiT (training/dit.py) -> model.DiT. Each (their name, ours) is a regular expression on the whole key.
_AUTHORS_DIT_NAMES = [
    (r'x_embedder\.proj\.(weight|bias)', r'patch_embed.\1'),
    (r'pos_embed', r'pos_embed'),
    (r'([ts])_embedder\.mlp\.([02])\.(weight|bias)', r'embed_\1.mlp.\2.\3'),
    (r'y_embedder\.embedding_table\.weight', r'embed_label.weight'),
    (r'blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)', r'blocks.\1.\2.\3'),
    (r'blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)', r'blocks.\1.\2.\3'),
    (r'blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)', r'blocks.\1.modulation.\2'),
    (r'final_layer\.linear\.(weight|bias)', r'out.\1'),
    (r'final_layer\.adaLN_modulation\.1\.(weight|bias)', r'out_modulation.\1'),
]


def convert_dit_state(state):
    """Their DiT state dict -> ours (model.DiT): x_embedder.proj -> patch_embed, t/s_embedder -> embed_t/embed_s,
    y_embedder.embedding_table -> embed_label, blocks.i.attn.qkv/proj and mlp.fc1/fc2 -> blocks.i.qkv/proj/fc1/fc2,
    adaLN_modulation.1 -> modulation (final_layer's -> out_modulation), final_layer.linear -> out. A weight our DiT
    does not have (qk-norm, a Fourier embedding's freqs, skip connections) is refused by name."""
    converted = {}
    for key, value in state.items():
        match = next(((m, ours) for theirs, ours in _AUTHORS_DIT_NAMES if (m := re.fullmatch(theirs, key))), None)
        if match is None:
            raise UsageError(f"the authors' DiT has a weight {key!r} that our DiT does not have (only the DiT of "
                             f"their ImageNet release is supported: no qk-norm, skip connections or Fourier embedding)")
        converted[match[0].expand(match[1])] = value
    return converted


def _child(record, path):
    """The record at a dotted module path (their names), or None."""
    for name in path.split('.'):
        record = record.state['_modules'].get(name) if _is_module(record) else None
    return record


def _authors_dit_config(dit, state, label_dim):
    """Our model.DiT config from their DiT: the sizes from the weights' shapes (their DiT_XL_2 etc. pass the sizes
    to DiT themselves, so _init_kwargs lack them), the heads and settings from its attributes; what our DiT would
    compute differently is refused by name."""
    a, kwargs = dit.state, _plain(dit.state.get('_init_kwargs', {}))
    missing = [k for k in ('pos_embed', 'x_embedder.proj.weight', 'y_embedder.embedding_table.weight',
                           'blocks.0.mlp.fc1.weight') if k not in state]
    _refuse_unless(not missing, 'no weights', missing, "their DiT's patch embedding, positions, label table and blocks")
    attention = _child(dit, 'blocks.0.attn')
    num_heads = a.get('num_heads') or (attention.state.get('num_heads') if attention is not None else None)
    _refuse_unless(isinstance(num_heads, int), 'num_heads', num_heads, 'a stored number of attention heads')
    _refuse_unless(a.get('s_embed') is True and _child(dit, 's_embedder') is not None, 's_embed', a.get('s_embed'),
                   "True (IMM's second time embedding)")
    _refuse_unless(not a.get('skip'), 'skip', a.get('skip'), 'False')
    for name in ('t_embedder', 's_embedder'):
        embedder = _child(dit, name).state
        _refuse_unless(embedder.get('embedding_type') == 'positional' and embedder.get('use_mlp') is True,
                       f'{name} (embedding_type, use_mlp)', (embedder.get('embedding_type'), embedder.get('use_mlp')),
                       "('positional', True)")
        _refuse_unless(state[f'{name}.mlp.0.weight'].shape[1] == 256, f'{name}.frequency_embedding_size',
                       state[f'{name}.mlp.0.weight'].shape[1], '256')
    depth = sum(1 for k in state if re.fullmatch(r'blocks\.\d+\.attn\.qkv\.weight', k))
    for i in range(depth):
        gelu = _child(dit, f'blocks.{i}.mlp.act')
        _refuse_unless(gelu is not None and gelu.state.get('approximate') == 'tanh', f'blocks.{i}.mlp.act',
                       gelu and (gelu.class_name, gelu.state.get('approximate')), "GELU(approximate='tanh')")
    _refuse_unless(label_dim > 0, 'label_dim', label_dim, 'a number of classes > 0 (their DiT needs labels)')
    rows = state['y_embedder.embedding_table.weight'].shape[0]
    _refuse_unless(rows > label_dim, 'a label table of rows', rows, f'> label_dim ({label_dim}), the null row')
    (_, patches, hidden), (_, channels, patch, _) = state['pos_embed'].shape, state['x_embedder.proj.weight'].shape
    return dict(arch='dit', img_resolution=round(patches ** 0.5) * patch, in_channels=channels, patch_size=patch,
                hidden_size=hidden, depth=depth, num_heads=num_heads,
                mlp_ratio=state['blocks.0.mlp.fc1.weight'].shape[0] / hidden, num_classes=label_dim,
                dropout=float(kwargs.get('dropout', 0.0)))


def _authors_encoder(data):
    """What the file says of the latent encoder (EDM2-style snapshots keep it next to 'ema'), or None."""
    encoder = data.get('encoder')
    if not isinstance(encoder, _Record) or not isinstance(encoder.state, dict):
        return None
    state = {k: _plain(v) for k, v in encoder.state.items() if not k.startswith('_')}
    return dict(class_name=encoder.class_name, **{k: str(v) if isinstance(v, torch.dtype) else v
                                                   for k, v in state.items()})


AUTHORS_IMAGENET_ENCODER_NOTE = (
    "the file stores no latent encoder: supply it as their configs/im256_generate_images.yaml does, the SD VAE "
    "stabilityai/sd-vae-ft-ema, latents normalised per channel by mean [0.86488, -0.27787343, 0.21616915, 0.3738409] "
    "and std [4.85503674, 5.31922414, 3.93725398, 3.9870003], then times 0.5")


def _authors_network(path, data):
    """(their IMMPrecond record, the network record inside it), or a UsageError saying what the file holds."""
    precond = data.get('ema') if isinstance(data, dict) else None
    if not (isinstance(precond, _Record) and precond.class_name == 'IMMPrecond'):
        if isinstance(precond, _Record):
            found = precond.class_name
        elif isinstance(data, dict):
            found = f'a dict with keys {list(data)[:8]}' if precond is None else f'ema = a {type(precond).__name__}'
        else:
            found = f'a {type(data).__name__}'
        raise UsageError(f"{path}: expected dict(ema=IMMPrecond) as the authors' release holds; found {found}")
    if not _is_module(precond):
        raise _not_a_module(precond)
    network = precond.state['_modules'].get('model')
    found = network.class_name if isinstance(network, _Record) else type(network).__name__
    if not (found == 'SongUNet' or re.fullmatch(r'DiT(_(S|B|L|XL)_\d+)?', found)):
        raise UsageError(f"{path}: the network is their {found}; only their SongUNet (DDPM++, CIFAR-10) and DiT "
                         f"(ImageNet) are supported")
    return precond, network


def load_pickle(path, second_time=None):
    """(net, cfg, info) from the authors' released pickle (cifar10.pt, imagenet256_ts_a2.pkl,
    imagenet256_s_a1.pkl), read as data: our model.UNet or model.DiT with their EMA weights, the imm.IMMConfig their
    sampler uses, and info on what was read (the latent encoder's settings where the file holds them). second_time
    ('s' | 't-s') overrides the stored second time condition (their README: imagenet256_s_a1.pkl needs 's')."""
    try:
        with open(path, 'rb') as f:
            data = _AuthorsUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, RuntimeError) as e:
        raise UsageError(f'{path}: not a pickle of the authors\' release ({type(e).__name__}: {e})') from None
    precond, network = _authors_network(path, data)
    state = _module_state(network)
    cfg = _authors_imm_config(precond, second_time, 'SongUNet' if network.class_name == 'SongUNet' else 'DiT')
    if network.class_name == 'SongUNet':
        config = _authors_net_config(network)
        ours = convert_unet_state(state)
    else:
        config = _authors_dit_config(network, state, _plain(precond.state.get('label_dim', 0)))
        ours = convert_dit_state(state)
        ours['embed_label.weight'] = ours['embed_label.weight'][:config['num_classes'] + 1]  # rows past null: unused
    dtypes = sorted({str(v.dtype) for v in state.values()})
    net = build_net(config)
    try:
        net.load_state_dict(ours)  # strict: every name and shape must match
    except RuntimeError as e:
        raise UsageError(f"{path}: the authors' weights do not fit the network their settings describe: {e}") from None
    net = net.double() if dtypes == ['torch.float64'] else net.float()
    encoder = _authors_encoder(data)
    info = dict(path=str(path), network=f'IMMPrecond({network.class_name})', net_config=config, dtypes=dtypes,
                precond_kwargs=_plain(precond.state.get('_init_kwargs', {})),
                network_kwargs=_plain(network.state.get('_init_kwargs', {})),
                stored_temb_type=_plain(precond.state.get('temb_type')),
                mixed_precision=precond.state.get('mixed_precision'), file_keys=sorted(map(str, data)),
                encoder=encoder, encoder_note=None if encoder or network.class_name == 'SongUNet'
                else AUTHORS_IMAGENET_ENCODER_NOTE)
    info['unet_kwargs'] = info['network_kwargs'] if network.class_name == 'SongUNet' else None
    return net.eval().requires_grad_(False), cfg, info
