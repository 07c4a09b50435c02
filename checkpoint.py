"""
A training run on disk: the checkpoint dict that train.py writes and train.py (--resume) and sample.py read,
its log, and the random-number state that makes a resumed run exact.

A checkpoint is a plain dict of tensors and Python values, so torch.load(weights_only=True) reads it and
nothing in it can run code:
    net, ema     state dicts of the trained network and of its EMA (sample.py uses 'ema' unless --raw)
    opt, scaler  optimizer (RAdam or AdamW) and fp16 grad-scaler state (scaler: None unless --precision fp16)
    step         optimizer steps done
    args         train.py's flags (vars(args)), defaults filled in
    net_config   model.build_net's argument: rebuilds the network
    imm_config   dataclasses.asdict(imm.IMMConfig): the method's settings
    data         name, kind ('image' | 'vector' | 'latent'), shape, num_classes, mean and std (vectors and latents:
                 x_raw = x / scale * std + mean); latents also: scale (sigma_d) and vae (what encoded them)
    rng          torch / CUDA / numpy / Python global RNG states
    best_fid     the best 2-step FID seen with --fid-every (None without)

    import checkpoint
    ckpt = checkpoint.read('runs/moons/ckpt.pt')                       # checked: every key above is there
    net, cfg, ckpt = checkpoint.load_for_sampling('runs/moons/ckpt.pt', raw=False)
    net, cfg, ckpt = checkpoint.load_for_sampling('cifar10.pt')        # the authors' release, through authors.py
    entries = checkpoint.read_log('runs/moons/log.jsonl')              # the run's log, one dict per line
"""
import json
import os
import random
from dataclasses import asdict

import numpy as np
import torch

import authors
from data import SIGMA_D
from imm import IMMConfig
from model import build_net
from util import UsageError, write_atomically

HUB = 'hf://'                         # --ckpt / --init-from hf://OWNER/REPO/FILE: a file on the Hugging Face Hub
KEYS = ['net', 'ema', 'opt', 'scaler', 'step', 'args', 'net_config', 'imm_config', 'data', 'rng']
SAMPLING_KEYS = ['net', 'ema', 'net_config', 'imm_config', 'data', 'args']  # what sample.py needs of them
DATA_KEYS = ['name', 'kind', 'shape', 'num_classes', 'mean', 'std']


def make(net, ema, opt, scaler, step, args, cfg, data, best_fid=None):
    """The checkpoint dict of a run at `step` (see the module docstring), with the global RNG states of now."""
    return {'net': net.state_dict(), 'ema': ema.state_dict(), 'opt': opt.state_dict(),
            'scaler': scaler.state_dict() if scaler.is_enabled() else None, 'step': step, 'args': vars(args),
            'net_config': net.config, 'imm_config': asdict(cfg), 'data': data_info(data), 'rng': rng_state(),
            'best_fid': best_fid}


def data_info(data):
    """What sample.py needs to know of a data.Dataset: its kind and shape, and how to undo its standardisation."""
    info = {'name': data.name, 'kind': data.kind, 'shape': list(data.x.shape[1:]), 'num_classes': data.num_classes,
            'mean': None if data.mean is None else data.mean.tolist(),
            'std': None if data.std is None else data.std.tolist()}
    if data.kind == 'latent':                          # the per-channel normalisation and the VAE that decodes
        info.update(scale=SIGMA_D, vae=data.vae)
    return info


def save(path, ckpt):
    """Write ckpt whole or not at all: an interrupted or failed save leaves the previous file and no temporary one.
    A failed write (a full disk, no permission, an I/O error) raises its OSError, not the RuntimeError of torch's
    writer that wraps it; the file is synced before the rename, so a node that crashes keeps one whole file."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            try:
                torch.save(ckpt, f)
            except RuntimeError as e:
                raise os_error_behind(e) or e
            f.flush()
            os.fsync(f.fileno())               # errors of delayed writes (network file systems) surface here
    write_atomically(path, write)


def os_error_behind(e):
    """The OSError that caused exception e (torch.save reports a failed write of its file as a RuntimeError whose
    context is the file's OSError), or None."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def read(path, keys=KEYS, flag='--resume'):
    """The checkpoint dict at path with at least `keys`, or a UsageError (naming `flag`) saying why not."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file (the checkpoint does not exist); "
                         f"pass a ckpt.pt written by train.py")
    try:  # our checkpoints hold tensors and plain Python values only, so the safe loader reads them
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {reason}); it is corrupt "
                         f"or not written by train.py") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing and 'data' in keys:
        missing = [f"data['{k}']" for k in DATA_KEYS if k not in ckpt['data']]
    if missing:
        raise UsageError(f"checkpoint {path!r} lacks {missing}; a train.py checkpoint holds {KEYS}, "
                         f"its data entry {DATA_KEYS}")
    return ckpt


def file_of(path):
    """The checkpoint file that --ckpt / --init-from name: a run folder stands for its ckpt.pt (runs/moons), and
    hf://OWNER/REPO/FILE for that file of a Hugging Face Hub repository (hub_file)."""
    if path.startswith(HUB):
        return hub_file(path)
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path


def hub_file(url):
    """The local copy of hf://OWNER/REPO/FILE (e.g. authors.RELEASE's hf://lumaai/imm/cifar10.pt): huggingface_hub
    downloads it into its cache (HF_HUB_CACHE, by default ~/.cache/huggingface/hub) on first use and finds it there
    afterwards; with HF_HUB_OFFLINE=1 it only looks in the cache. The file is then read like any other checkpoint."""
    owner, repo, filename = (url[len(HUB):].split('/', 2) + ['', '', ''])[:3]
    if not (owner and repo and filename):
        raise UsageError(f"{url}: expected hf://OWNER/REPO/FILE, e.g. {authors.RELEASE[0]}")
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError(f"{url}: reading from the Hugging Face Hub needs huggingface_hub: "
                         f"pip install huggingface_hub") from None
    try:
        return huggingface_hub.hf_hub_download(repo_id=f'{owner}/{repo}', filename=filename)
    except Exception as e:                 # offline and not cached, no such repository or file, no network
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{url}: cannot get {filename!r} of the Hugging Face Hub repository {owner}/{repo} "
                         f"({type(e).__name__}: {reason})") from None


def load_for_sampling(path, raw=False, flag='--ckpt'):
    """(network with the EMA weights, or the training weights if raw; its IMMConfig; the checkpoint dict), from a
    train.py checkpoint or from the authors' released pickle (cifar10.pt), for which the dict is made up of what
    sample.py reads (authors.as_checkpoint)."""
    if os.path.isfile(path) and authors.is_pickle(path):
        if raw:
            raise UsageError(f"--raw: {path} is the authors' release, which holds only the EMA weights")
        return authors.as_checkpoint(path)
    ckpt = read(path, SAMPLING_KEYS, flag=flag)
    if ckpt['net_config'].get('arch') == 'unet' and 'augment_dim' not in ckpt['net_config']:
        raise UsageError(f"checkpoint {path!r} was written before model.UNet computed the authors' SongUNet (their "
                         f"embedding order, attention layout and GroupNorm eps): its weights would compute another "
                         f"function here; retrain it with this version")
    try:
        net = build_net(ckpt['net_config'])
        cfg = IMMConfig(**ckpt['imm_config'])
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {path!r}: cannot rebuild its network or IMM config ({e}); "
                         f"was it written by another version of model.py / imm.py?") from None
    key = 'net' if raw else 'ema'
    load_weights(net, ckpt[key], f"checkpoint {path!r}: ckpt['{key}']",
                 '' if raw else '; pass --raw to use the training weights')
    return net, cfg, ckpt


def load_weights(net, weights, what, hint=''):
    """net.load_state_dict(weights), or a UsageError listing (up to 3) names and shapes that do not fit."""
    if not isinstance(weights, dict):
        raise UsageError(f"{what} is {type(weights).__name__}, not a state dict{hint}")
    expected = net.state_dict()
    problems = [f'missing {k}' for k in expected if k not in weights]
    problems += [f'unexpected {k}' for k in weights if k not in expected]
    problems += [f'{k} is {list(weights[k].shape)}, the net wants {list(v.shape)}'
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
        raise UsageError(f"{what} does not fit the network its net_config {net.config} builds: "
                         f"{'; '.join(problems[:3])}{more}")
    net.load_state_dict(weights)


def config_differences(saved, wanted, prefix):
    """'prefix.key: checkpoint A, flags B' for every key whose value differs (compared as JSON)."""
    saved, wanted = json.loads(json.dumps(saved)), json.loads(json.dumps(wanted))
    return [f"{prefix}.{k}: checkpoint {saved.get(k)!r}, flags {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def check_resumable(ckpt, path, net_config, cfg, loss, optimizer='radam'):
    """A UsageError naming every setting in which the checkpoint's run differs from the one asked for."""
    saved = {'loss': ckpt['args'].get('loss'), 'optimizer': ckpt['args'].get('optimizer', 'radam')}
    differences = (config_differences(ckpt['net_config'], net_config, 'net_config')
                   + config_differences(ckpt['imm_config'], asdict(cfg), 'imm_config')
                   + config_differences(saved, {'loss': loss, 'optimizer': optimizer}, 'args'))
    if differences:
        raise UsageError(f"checkpoint {path!r} was trained with another config: {'; '.join(differences)}. "
                         f"Pass the flags of the run that wrote it.")


def rng_state():
    """Global RNG states (plain Python values and tensors, so torch.load(weights_only=True) reads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [name, keys.tolist(), pos, has_gauss, cached], 'python': random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state['python'])


def read_log(path):
    """The entries of a log.jsonl (dicts with at least 'step'), [] if there is none. A line cut short (a crash or a
    full disk while it was written) is left out."""
    if not os.path.exists(path):
        return []
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [e for e in entries if isinstance(e, dict) and 'step' in e]


def trim_log(path, step):
    """Drop the entries of log.jsonl after `step` (a resumed run logs those steps again; a new run, step 0, starts
    an empty log). Returns the entries kept."""
    kept = [e for e in read_log(path) if e['step'] <= step]
    if os.path.exists(path):
        def write(tmp):
            with open(tmp, 'w') as f:
                f.writelines(json.dumps(e) + '\n' for e in kept)
        write_atomically(path, write)
    return kept
