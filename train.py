"""
Train a few-step generator with Inductive Moment Matching (IMM, Zhou/Ermon/Song ICML 2025). One flat loop:
draw a batch and per-group times (s, t), take imm.imm_loss, step RAdam, update the EMA; checkpoints,
pictures and logs go to --out (default runs/<dataset>).

    python train.py --dataset moons                 # 2-D toy on a CPU, a few minutes -> runs/moons/
    python train.py --dataset moons --resume        # continue runs/moons/ckpt.pt (same flags as the first run)
    python train.py --dataset cifar10               # the paper's CIFAR-10 run: 400k steps of batch 4096 (spec 7)
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --precision bf16 --compile
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
    python train.py --dataset cifar10 --fid-every 20000 --fid-ref refs/cifar10.npz   # FID while training
    python train.py --dataset cifar10 --bench 20 --precision bf16   # speed of the chosen config: one JSON line

--dataset is cifar10, a folder of images, a .npy/.npz array, or a 2-D toy (checkerboard, moons, spirals,
gaussians8); see data.py. Images train the U-Net (model.PRESETS['ddpmpp']) with the paper's settings;
vectors train the MLP with settings that give good samples in a few CPU minutes (DEFAULTS below).
--batch is the global batch: it is split across torchrun's ranks, then into micro-batches of whole groups
of M particles (gradient accumulation). Everything random in a step is drawn from generators seeded by
(--seed, step), so a resumed run ends with the same weights as an uninterrupted one, and 1 or N ranks see
the same data, times and noise. Then: python sample.py --ckpt runs/moons
"""

import argparse
import contextlib
import copy
import functools
import gc
import inspect
import json
import os
import random
import re
import resource
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from data import (SIGMA_D, Dataset, UsageError, decode, load_dataset, save_image_grid, save_scatter,
                  to_uint8, write_atomically)
from imm import IMMConfig, draw_times, fm_loss, imm_loss, sample, sampling_times
from model import PRESETS, build_net

# Settings that depend on the kind of data. Images: the paper's CIFAR-10 run (spec section 7, Table 5).
# Vectors (2-D toys): a 64-wide MLP on one CPU thread, 6000 steps, ~100 s to two clean moons at 2 steps.
DEFAULTS = {
    'image': dict(model='ddpmpp', channels=None, iters=400_000, batch=4096, lr=1e-4, ema=0.9999,
                  log_every=100, ckpt_every=5000, sample_every=10_000, threads=0),
    'vector': dict(model='mlp', channels=64, iters=6000, batch=512, lr=2e-3, ema=0.999,
                   log_every=100, ckpt_every=1000, sample_every=1000, threads=1),
}
# Dense peak TFLOP/s of one GPU per --precision, for MFU (H200: the H100 SXM chip with more memory).
PEAK_TFLOPS = {'H100': dict(bf16=989, fp16=989, tf32=495, fp32=67),
               'H200': dict(bf16=989, fp16=989, tf32=495, fp32=67)}
SAMPLES_SHOWN = {'image': 64, 'vector': 10_000}   # images in a grid / points in a scatter picture
BENCH_WARMUP = 3                                  # untimed steps before --bench timing (compile, autotuning)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train an IMM generator (see the module docstring).')
    add = p.add_argument
    # data
    add('--dataset', default='cifar10',
        help='cifar10, a folder of images, a .npy/.npz file, or a toy: checkerboard, moons, spirals, gaussians8')
    add('--data-dir', default='data', help='where cifar10 is kept (downloaded there if missing)')
    add('--resolution', type=int, help='crop and resize images to this side (default: their own size)')
    add('--xflip', action=argparse.BooleanOptionalAction, default=True, help='random horizontal flips of images')
    add('--cond', action='store_true', help='class-conditional training on the dataset labels')
    add('--label-dropout', type=float, default=0.1,
        help='with --cond, probability of replacing a label by the null class (for guidance)')
    add('--workers', type=int, default=min(8, os.cpu_count() or 1), help='processes that decode an image folder')
    # network
    add('--model', choices=sorted(PRESETS),
        help='network preset from model.PRESETS (default: ddpmpp for images, mlp for vectors)')
    add('--channels', type=int,
        help="width: U-Net model_channels, MLP hidden (default: the preset's for images, 64 for vectors)")
    add('--dropout', type=float, help="override the preset's dropout (ddpmpp: 0.2, the paper's)")
    # method (imm.IMMConfig; spec sections 2-5)
    add('--loss', choices=['imm', 'fm'], default='imm',
        help='imm: moment matching (Eq. 12); fm: the flow-matching baseline with the same net')
    add('--particles', type=int, default=4, help='M, samples per group sharing (s, r, t); 1 = consistency training')
    add('--schedule', choices=['fm', 'cosine'], default='fm', help='noise schedule alpha_t, sigma_t (spec 2)')
    add('--param', choices=['simple_edm', 'euler_fm', 'identity'], default='simple_edm',
        help='parameterization c_skip, c_out of f_{s,t} (spec 4)')
    add('--k', type=int, default=15, help='r(s,t) steps eta by (eta_max - eta_min) / 2^k (paper: 15 on CIFAR-10)')
    add('--a', type=float, default=1.0, help='time weighting exponent on alpha_t (Eq. 13)')
    add('--b', type=float, default=5.0, help='time weighting sigmoid shift (Eq. 13)')
    add('--eps', type=float, default=0.006, help='smallest time, where sampling ends')
    add('--T', type=float, help='largest time, where sampling starts (default: 0.994 for fm, 0.996 for cosine)')
    add('--second-time', choices=['s', 't-s'], default='s', help='second network condition: 1000 s or 1000 (t - s)')
    add('--min-gap', type=float, default=0.0, help='keep r <= t - min_gap (App. I.6: 1e-4 with fp16); 0 = off')
    add('--target-fp32', action=argparse.BooleanOptionalAction, default=True,
        help='run the stop-gradient target pass in fp32 under bf16/fp16')
    # optimisation
    add('--iters', type=int, help='optimizer steps (default: 400k for images, 6000 for vectors)')
    add('--batch', type=int,
        help='global batch, split across ranks and micro-batches (default: 4096 for images, 512 for vectors)')
    add('--micro-batch', default='auto',
        help='rows per forward/backward on each rank, a multiple of M; auto: the per-rank batch, halved until it fits')
    add('--lr', type=float, help='RAdam learning rate (default: 1e-4 for images, 2e-3 for vectors)')
    add('--ema', type=float, help='EMA decay per step (default: 0.9999 for images, 0.999 for vectors)')
    add('--grad-clip', type=float, default=0.0, help='clip the gradient norm to this value; 0 = off')
    add('--seed', type=int, default=0, help='seeds the weights and every random draw of training')
    # system
    add('--device', help='cpu or cuda (default: cuda when available); torchrun ranks use cuda:LOCAL_RANK')
    add('--precision', choices=['fp32', 'tf32', 'bf16', 'fp16'], default='tf32',
        help='fp32; TF32 matmuls (paper); bf16 or fp16 autocast (fp16 with a grad scaler)')
    add('--threads', type=int,
        help="CPU threads for torch; 0 = torch's default (default: 1 for vectors, where more only add overhead)")
    add('--compile', action='store_true', help='torch.compile the network (eager, with a warning, if it fails)')
    # output
    add('--out', help='output folder (default: runs/<dataset>)')
    add('--resume', nargs='?', const='',
        help='continue from a checkpoint (default: <out>/ckpt.pt); pass the flags of the first run')
    add('--log-every', type=int, help='steps between progress lines and log.jsonl entries (default 100)')
    add('--ckpt-every', type=int, help='steps between checkpoints (default: 5000 for images, 1000 for vectors)')
    add('--sample-every', type=int,
        help='steps between pictures of 1- and 2-step EMA samples; 0 = never (default: 10000 images, 1000 vectors)')
    add('--fid-every', type=int, default=0, help='steps between FID evaluations of the EMA at 1 and 2 steps; 0 = off')
    add('--fid-n', type=int, default=10_000, help='generated images per FID evaluation')
    add('--fid-ref', help='reference statistics .npz (keys mu, sigma) from `python fid.py ref`')
    add('--fid-weights', help='Inception weights file for FID offline (default: downloaded once)')
    add('--bench', type=int, default=0,
        help='time this many steps (after warm-up) on the chosen config, print one JSON line, write nothing')
    add('--peak-tflops', type=float, help='peak TFLOP/s of one device for MFU in --bench (default: known GPUs)')
    return p.parse_args(argv)


def seed_for(*keys):
    """A 32-bit seed that mixes integer keys (seed, stream, step, ...) so that nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch, device):
    """The order in which epoch `epoch` visits the n examples: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator(device).manual_seed(seed_for(seed, 0, epoch)), device=device)


def batch_rows(step, batch, n, seed, device):
    """Dataset rows of global batch `step`: positions step*batch ... of an endless stream of shuffled epochs."""
    rows, pos, end = [], step * batch, (step + 1) * batch
    while pos < end:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, end - pos)
        rows.append(epoch_order(n, seed, epoch, device)[offset:offset + take])
        pos += take
    return torch.cat(rows)


def micro_loss(model, x, noise, t, s, labels, cfg, loss, autocast):
    """The training loss of one micro-batch: IMM (t, s one per group of M rows) or flow matching (t per row)."""
    with autocast:
        if loss == 'imm':
            return imm_loss(model, x, noise, t, s, cfg, labels)
        return fm_loss(model, x, noise, t, cfg, labels)


def trial_step(model, shape, rows, num_classes, cfg, loss, autocast, device):
    """One forward/backward on `rows` synthetic rows, gradients dropped: checks that a micro-batch fits and compiles."""
    groups = rows // cfg.particles if loss == 'imm' else rows
    t, s = draw_times(groups, cfg, device=device)
    x = torch.zeros(rows, *shape, device=device)
    labels = torch.zeros(rows, dtype=torch.long, device=device) if num_classes else None
    micro_loss(model, x, cfg.sigma_d * torch.randn_like(x), t, s, labels, cfg, loss, autocast).backward()
    model.zero_grad(set_to_none=True)


def read_checkpoint(path):
    """The checkpoint dict at path, or a UsageError saying why it cannot be used."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist; --resume takes a ckpt.pt written by train.py")
    try:  # our checkpoints hold tensors and plain Python values only, so the safe loader reads them
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot read checkpoint {path!r} ({reason}); it is corrupt or not written by train.py") \
            from None
    needed = ['net', 'ema', 'opt', 'scaler', 'step', 'args', 'net_config', 'imm_config', 'data', 'rng']
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UsageError(f"checkpoint {path!r} lacks {missing}; a train.py checkpoint holds {needed}")
    return ckpt


def config_differences(saved, wanted, prefix):
    """'prefix.key: checkpoint A, flags B' for every key whose value differs (compared as JSON)."""
    saved, wanted = json.loads(json.dumps(saved)), json.loads(json.dumps(wanted))
    return [f"{prefix}.{k}: checkpoint {saved.get(k)!r}, flags {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


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


def forward_flops(net, shape, num_classes, device):
    """FLOPs of one network forward per sample, counted by torch (FlopCounterMode) on a forward of 2 samples."""
    x = torch.zeros(2, *shape, device=device)
    c = torch.full((2,), 500.0, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device) if num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, c, c, labels)
    return counter.get_total_flops() / 2


def ema_fid(ema, cfg, steps, shape, num_classes, args, fid_ref, inception, autocast, device):
    """FID of --fid-n samples of the EMA net at `steps` steps; the same noise (and labels) at every evaluation."""
    from fid import fid_of_sampler
    noise_gen = torch.Generator(device).manual_seed(seed_for(args.seed, 3))

    def generate(b):
        z = cfg.sigma_d * torch.randn(b, *shape, generator=noise_gen, device=device)
        labels = torch.randint(num_classes, (b,), generator=noise_gen, device=device) if num_classes else None
        with autocast:
            x0 = sample(ema, z, sampling_times(steps, cfg), cfg, labels, denoiser=args.loss == 'fm')
        return to_uint8(x0)
    return fid_of_sampler(generate, args.fid_n, fid_ref, net=inception)


def main(argv=None):
    args = parse_args(argv)

    # ---- processes and devices: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1
    distributed = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if distributed else (0, 1)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    elif device.type != 'cpu':
        raise UsageError(f"--device {args.device}: accepted cpu or cuda")
    if distributed:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    say = print if rank == 0 else (lambda *a, **k: None)   # only rank 0 talks and writes

    # ---- data (rank 0 first: it may download CIFAR-10)
    if args.bench and args.dataset == 'cifar10':       # synthetic images: timing needs no download
        side = args.resolution or 32
        data = Dataset('cifar10', 'image', torch.randint(0, 256, (4096, 3, side, side), dtype=torch.uint8),
                       torch.randint(0, 10, (4096,)), 10)
    else:
        if distributed and rank != 0:
            dist.barrier()
        data = load_dataset(args.dataset, args.data_dir, args.resolution, args.workers)
        if distributed and rank == 0:
            dist.barrier()
    for key, value in DEFAULTS[data.kind].items():       # fill in what the user left to the data kind
        if getattr(args, key) is None:
            setattr(args, key, value)
    shape, n = list(data.x.shape[1:]), len(data.x)
    if args.cond and data.num_classes == 0:
        raise UsageError(f"--cond: dataset {args.dataset!r} has no labels; leave out --cond, or use a labelled dataset "
                         f"(cifar10, a toy, a folder with one sub-folder per class, an .npz with 'labels')")

    # ---- method and network
    if args.T is None:
        args.T = 0.994 if args.schedule == 'fm' else 0.996
    try:
        cfg = IMMConfig(schedule=args.schedule, param=args.param, particles=args.particles, k=args.k, a=args.a,
                        b=args.b, eps=args.eps, T=args.T, sigma_d=SIGMA_D, second_time=args.second_time,
                        min_gap=args.min_gap, target_fp32=args.target_fp32)
    except ValueError as e:
        raise UsageError(re.sub(r'IMMConfig\.(\w+)=', lambda m: f"--{m.group(1).replace('_', '-')} ", str(e))) from None
    net_config = dict(PRESETS[args.model], num_classes=data.num_classes if args.cond else 0)
    if net_config['arch'] == 'unet':
        if data.kind != 'image':
            raise UsageError(f"--model {args.model} is a U-Net for images, but {args.dataset!r} holds vectors "
                             f"{shape}; use --model mlp")
        net_config.update(img_resolution=shape[1], in_channels=shape[0])
        if args.channels:
            net_config['model_channels'] = args.channels
    else:
        if data.kind != 'vector':
            raise UsageError(f"--model {args.model} is an MLP for vectors, but {args.dataset!r} holds images "
                             f"{shape}; use a U-Net preset: {', '.join(k for k in PRESETS if k != args.model)}")
        net_config['dim'] = shape[0]
        if args.channels:
            net_config['hidden'] = args.channels
    if args.dropout is not None:
        net_config['dropout'] = args.dropout

    # ---- batch layout: global batch -> ranks -> micro-batches of whole groups of M particles
    M = cfg.particles if args.loss == 'imm' else 1
    for flag, ok, accepted in [
            ('iters', args.iters >= 0, 'an integer >= 0'), ('batch', args.batch >= 1, 'an integer >= 1'),
            ('log_every', args.log_every >= 1, 'an integer >= 1'),
            ('ckpt_every', args.ckpt_every >= 1, 'an integer >= 1'),
            ('sample_every', args.sample_every >= 0, 'an integer >= 0 (0 = never)'),
            ('fid_every', args.fid_every >= 0, 'an integer >= 0 (0 = never)'),
            ('fid_n', args.fid_n >= 2, 'an integer >= 2'), ('bench', args.bench >= 0, 'an integer >= 0'),
            ('lr', args.lr > 0, 'a positive number'), ('ema', 0 <= args.ema < 1, 'a number in [0, 1)'),
            ('grad_clip', args.grad_clip >= 0, 'a number >= 0 (0 = off)'),
            ('label_dropout', 0 <= args.label_dropout <= 1, 'a probability in [0, 1]'),
            ('threads', args.threads >= 0, "an integer >= 0 (0 = torch's default)")]:
        if not ok:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: accepted {accepted}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch % (M * world):
        raise UsageError(f"--batch {args.batch} must be divisible by M x ranks = {M} x {world} = {M * world}, "
                         f"so that every rank gets whole groups of M particles (--particles {M}); "
                         f"e.g. --batch {(args.batch // (M * world) + 1) * M * world}")
    per_rank = args.batch // world
    if args.micro_batch != 'auto':
        try:
            micro = int(args.micro_batch)
        except ValueError:
            micro = 0
        if micro < 1 or micro % M or per_rank % micro:
            raise UsageError(f"--micro-batch {args.micro_batch}: accepted 'auto' or a multiple of M={M} that divides "
                             f"the per-rank batch {per_rank} (--batch {args.batch} over {world} ranks)")
    if args.fid_every and data.kind != 'image':
        raise UsageError(f"--fid-every {args.fid_every}: FID needs images, {args.dataset!r} holds vectors")
    if args.fid_every and not (args.fid_ref and os.path.isfile(args.fid_ref)):
        raise UsageError(f"--fid-ref {args.fid_ref}: no such file; --fid-every needs reference statistics, "
                         f"made with: python fid.py ref --dataset {args.dataset} --out refs/stats.npz")

    # ---- where to write, and where to resume from (checked before anything is written)
    args.out = args.out or os.path.join('runs', os.path.splitext(os.path.basename(args.dataset.rstrip('/\\')))[0])
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    ckpt = None
    torch.manual_seed(args.seed)                           # the initial weights (replaced when resuming)
    net = build_net(net_config)
    if args.resume is not None and not args.bench:
        resume_path = args.resume or ckpt_path
        ckpt = read_checkpoint(resume_path)
        differences = (config_differences(ckpt['net_config'], net.config, 'net_config')
                       + config_differences(ckpt['imm_config'], asdict(cfg), 'imm_config')
                       + config_differences({'loss': ckpt['args'].get('loss')}, {'loss': args.loss}, 'args'))
        if differences:
            raise UsageError(f"checkpoint {resume_path!r} was trained with another config: {'; '.join(differences)}. "
                             f"Pass the flags of the run that wrote it.")
    elif os.path.exists(ckpt_path) and not args.bench:
        raise UsageError(f"{args.out!r} already holds a run ({ckpt_path}); continue it with --resume, "
                         f"or start a new one with another --out")

    # ---- precision
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == 'tf32'
    torch.backends.cudnn.benchmark = True
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')

    # ---- network, EMA, optimizer (state from the checkpoint when resuming)
    net = net.to(device)
    channels_last = device.type == 'cuda' and data.kind == 'image'
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    fused = {'fused': True} if 'fused' in inspect.signature(torch.optim.RAdam).parameters and device.type == 'cuda' \
        else {'foreach': device.type == 'cuda'}                # one kernel per op for all tensors
    opt = torch.optim.RAdam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0, **fused)
    start_step, best_fid = 0, None
    if ckpt is not None:
        net.load_state_dict(ckpt['net'])
        ema.load_state_dict(ckpt['ema'])
        opt.load_state_dict(ckpt['opt'])
        for group in opt.param_groups:                    # --lr may change on resume
            group['lr'] = args.lr
        if ckpt['scaler'] is not None and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        start_step, best_fid = ckpt['step'], ckpt.get('best_fid')
        del ckpt
    params = sum(p.numel() for p in net.parameters())
    data_info = {'name': data.name, 'kind': data.kind, 'shape': shape, 'num_classes': data.num_classes,
                 'mean': None if data.mean is None else data.mean.tolist(),
                 'std': None if data.std is None else data.std.tolist()}

    def checkpoint(step):
        return {'net': net.state_dict(), 'ema': ema.state_dict(), 'opt': opt.state_dict(),
                'scaler': scaler.state_dict() if scaler.is_enabled() else None, 'step': step, 'args': vars(args),
                'net_config': net.config, 'imm_config': asdict(cfg), 'data': data_info, 'rng': rng_state(),
                'best_fid': best_fid}

    # ---- micro-batch size (largest that fits), torch.compile (eager if it fails), DDP
    num_classes = net.num_classes
    if args.micro_batch == 'auto':
        micro = per_rank
        while device.type == 'cuda':
            try:
                trial_step(net, shape, micro, num_classes, cfg, args.loss, autocast, device)
                break
            except torch.cuda.OutOfMemoryError:
                pass                                      # retried below, once the exception has let go of its memory
            net.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            smaller = [m for m in range(M, micro // 2 + 1, M) if per_rank % m == 0]
            if not smaller:
                raise UsageError(f"--micro-batch auto: even {micro} rows (M={M}) do not fit in GPU memory; "
                                 f"use a smaller --model / --channels or --precision bf16")
            micro = smaller[-1]
        if distributed:                                   # every rank must use the same split
            agreed = torch.tensor([micro], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            micro = int(agreed.item())
    num_micro = per_rank // micro
    model = net
    if args.compile:
        try:
            model = torch.compile(net)
            trial_step(model, shape, micro, num_classes, cfg, args.loss, autocast, device)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: torch.compile failed ({type(e).__name__}: {reason}); training without it", file=sys.stderr)
            model = net
            net.zero_grad(set_to_none=True)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                  broadcast_buffers=False) if distributed else None
    train_net = ddp if ddp is not None else model

    inception = None
    if args.fid_every and rank == 0 and not args.bench:
        from fid import InceptionFeatures, load_ref
        try:
            inception = InceptionFeatures(args.fid_weights).to(device)
            fid_ref = load_ref(args.fid_ref)
        except Exception as e:
            raise UsageError(f"FID set-up failed: {e}") from None

    # ---- output folder, fixed noise for pictures
    if rank == 0 and not args.bench:
        os.makedirs(os.path.join(args.out, 'samples'), exist_ok=True)
        log_path = os.path.join(args.out, 'log.jsonl')
        if start_step and os.path.exists(log_path):       # drop entries of steps after the checkpoint
            with open(log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)['step'] <= start_step]
            with open(log_path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(log_path + '.tmp', log_path)
        log_file = open(log_path, 'a')
        shown = SAMPLES_SHOWN[data.kind]
        fixed = torch.Generator().manual_seed(args.seed)
        fixed_noise = (cfg.sigma_d * torch.randn(shown, *shape, generator=fixed)).to(device)
        fixed_labels = (torch.arange(shown) % num_classes).to(device) if num_classes else None
        extent = None
        if data.kind == 'vector':                          # the data's own picture, on the samples' axes
            real = decode(data.x[torch.randperm(n, generator=fixed)[:shown]], data)
            lo, hi = float(real[:, :2].min()), float(real[:, :2].max())
            extent = (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
            save_scatter(real, os.path.join(args.out, 'data.png'), extent)
    data_x = data.x.to(device)
    data_labels = data.labels.to(device) if num_classes else None
    iters = start_step + BENCH_WARMUP + args.bench if args.bench else args.iters
    say(f"{data.name}: {data.kind} {shape} x {n}{f', {num_classes} classes' if num_classes else ''} | "
        f"{net_config['arch']} {args.model} {params / 1e6:.2f}M params | {args.loss} M={M} | batch {args.batch} = "
        f"{world} rank(s) x {num_micro} x {micro} | {device} {args.precision}"
        f"{' compiled' if model is not net else ''} | "
        f"steps {start_step}->{iters} | {'bench' if args.bench else args.out}")

    # ---- Ctrl-C / SIGTERM: finish the step in progress, write a checkpoint, stop
    stop = []
    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)             # a second signal stops at once
    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    # ---- the training loop
    gen = torch.Generator(device)                          # draws of a step, the same on every rank
    mine = slice(rank * per_rank, (rank + 1) * per_rank)   # this rank's rows of the global batch ...
    my_groups = slice(rank * per_rank // M, (rank + 1) * per_rank // M)  # ... and its groups of M rows
    loss_sum = torch.zeros((), device=device)              # summed on the device; read only when logging
    bad_step = torch.full((), -1, device=device)           # first step with a non-finite loss, -1 if none
    last_good = None                                       # step of the newest checkpoint written
    t_last, step_last, bench_start = time.time(), start_step, None
    status = 0
    for step in range(start_step, iters):
        if stop:
            say(f"stopped by signal {stop[0]} at step {step}")
            if int(bad_step) < 0 and rank == 0 and not args.bench:
                write_atomically(ckpt_path, functools.partial(torch.save, checkpoint(step)))
                say(f"wrote {ckpt_path} (step {step}); continue with the same command plus --resume")
            break
        if args.bench and step == start_step + BENCH_WARMUP:
            if device.type == 'cuda':
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            bench_start = time.time()

        # Draw the global batch: rows, times, flips, noise, dropped labels; this rank keeps its slice.
        gen.manual_seed(seed_for(args.seed, 1, step))
        torch.manual_seed(seed_for(args.seed, 2, step, rank))  # dropout masks, different on every rank
        rows = batch_rows(step, args.batch, n, args.seed, device)[mine]
        t, s = (v[my_groups] for v in draw_times(args.batch // M, cfg, generator=gen, device=device))
        x = data_x[rows]
        if data.kind == 'image':                           # uint8 -> [-1, 1] (spec 6), random x-flip
            x = x.float() / 127.5 - 1
            if args.xflip:
                flip = torch.rand(args.batch, generator=gen, device=device)[mine] < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        noise = cfg.sigma_d * torch.randn(args.batch, *shape, generator=gen, device=device)[mine]
        labels = None
        if num_classes:
            drop = torch.rand(args.batch, generator=gen, device=device)[mine] < args.label_dropout
            labels = torch.where(drop, num_classes, data_labels[rows])

        # Forward/backward per micro-batch; gradients of all but the last are not all-reduced (no_sync).
        step_loss = torch.zeros((), device=device)
        for i in range(num_micro):
            r = slice(i * micro, (i + 1) * micro)
            g = slice(i * micro // M, (i + 1) * micro // M) if args.loss == 'imm' else r
            with ddp.no_sync() if ddp is not None and i < num_micro - 1 else contextlib.nullcontext():
                loss = micro_loss(train_net, x[r], noise[r], t[g], s[g], None if labels is None else labels[r],
                                  cfg, args.loss, autocast) / num_micro
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        if args.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():                              # EMA: ema += (1 - decay) (net - ema), one fused op
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema)
        loss_sum += step_loss
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(step_loss), step + 1, bad_step)
        done = step + 1

        # Housekeeping (reads the device, so only on the steps that need it).
        if args.bench:
            continue
        log_now = done % args.log_every == 0 or done == iters
        ckpt_now = done % args.ckpt_every == 0 or done == iters
        sample_now = args.sample_every and (done % args.sample_every == 0 or done == iters)
        fid_now = args.fid_every and (done % args.fid_every == 0 or done == iters)
        if not (log_now or ckpt_now or sample_now or fid_now):
            continue
        if distributed:                                    # every rank stops together
            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
        if int(bad_step) >= 0:
            kept = f"the last good checkpoint, {ckpt_path} (step {last_good or start_step}), is intact" \
                if last_good or start_step else "no checkpoint was written"
            if rank == 0:
                print(f"error: the loss became non-finite at step {int(bad_step)}; stopping. {kept}. "
                      f"Try a lower --lr, --grad-clip 1, or --precision fp32.", file=sys.stderr)
            status = 1
            break
        if log_now:
            if distributed:
                dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / (done - step_last) / world
            loss_sum.zero_()
            sec = (time.time() - t_last) / (done - step_last)
            eta = sec * (iters - done)
            entry = {'step': done, 'loss': mean_loss, 'img_per_s': args.batch / sec, 'sec_per_step': sec,
                     'eta_s': eta, 'time': time.time()}
            say(f"step {done}/{iters} | loss {mean_loss:.4g} | {args.batch / sec:.0f} img/s | {sec:.3f} s/step | "
                f"ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s", flush=True)
            if rank == 0:
                log_file.write(json.dumps(entry) + '\n')
                log_file.flush()
            t_last, step_last = time.time(), done
        if rank == 0 and sample_now:                       # 1- and 2-step samples of the EMA from fixed noise
            for steps in (1, 2):
                x0 = decode(sample(ema, fixed_noise, sampling_times(steps, cfg), cfg, fixed_labels,
                                   denoiser=args.loss == 'fm'), data)
                path = os.path.join(args.out, 'samples', f'{done:07d}-{steps}step.png')
                save_image_grid(x0, path) if data.kind == 'image' else save_scatter(x0, path, extent)
        if fid_now:                                        # FID of the EMA at 1 and 2 steps (rank 0; others wait)
            if rank == 0:
                fids = {steps: ema_fid(ema, cfg, steps, shape, num_classes, args, fid_ref, inception, autocast, device)
                        for steps in (1, 2)}
                entry = {'step': done, 'fid_1step': fids[1], 'fid_2step': fids[2]}
                say(f"step {done} | FID-{args.fid_n // 1000}k 1-step {fids[1]:.3f} | 2-step {fids[2]:.3f}", flush=True)
                log_file.write(json.dumps(entry) + '\n')
                log_file.flush()
                if best_fid is None or fids[2] < best_fid:
                    best_fid = fids[2]
                    write_atomically(os.path.join(args.out, 'ckpt-best.pt'),
                                     functools.partial(torch.save, checkpoint(done)))
            if distributed:
                dist.barrier()
        if rank == 0 and ckpt_now:
            write_atomically(ckpt_path, functools.partial(torch.save, checkpoint(done)))
            last_good = done
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)

    if args.bench and bench_start is not None:
        if device.type == 'cuda':
            torch.cuda.synchronize()
        step_s = (time.time() - bench_start) / args.bench
        fwd_flops = forward_flops(net, shape, num_classes, device)
        passes = 4 if args.loss == 'imm' else 3            # forward passes' worth: IMM 2 forward + backward
        tflops = fwd_flops * passes * args.batch / step_s / 1e12 / world                            # per device
        gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
        peak = args.peak_tflops or next((v[args.precision] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        peak_mem = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        say(json.dumps({'img_per_s': round(args.batch / step_s, 2), 'step_s': round(step_s, 5),
                        'peak_mem_gb': round(peak_mem / 2 ** 30, 3), 'tflops': round(tflops, 3),
                        'mfu': round(tflops / peak, 4) if peak else None, 'peak_tflops': peak,
                        'fwd_gflops_per_sample': float(f"{fwd_flops / 1e9:.4g}"),
                        'device': gpu or str(device), 'world_size': world, 'precision': args.precision,
                        'compiled': model is not net, 'model': args.model, 'params_m': round(params / 1e6, 3),
                        'loss': args.loss, 'batch': args.batch, 'micro_batch': micro, 'steps': args.bench}), flush=True)
    elif rank == 0 and status == 0 and not stop:
        say(f"done: {ckpt_path} at step {iters}. Sample with: python sample.py --ckpt {args.out}")
    if rank == 0 and not args.bench:
        log_file.close()
    if distributed:  # tear down together, DDP first: gloo work it still holds at interpreter exit aborts the rank
        ddp = train_net = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == '__main__':
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
