"""
Train a few-step generator with Inductive Moment Matching (IMM, Zhou/Ermon/Song ICML 2025): draw a batch and
per-group times (s, t), take imm.imm_loss, step RAdam (AdamW for latents), update the EMA; checkpoints, pictures
and logs go to --out (default runs/<dataset>).

    python train.py --dataset moons                 # 2-D toy on a CPU, a few minutes -> runs/moons/
    python train.py --dataset digits                # 8x8 handwritten digits on a CPU, ~5 minutes -> runs/digits/
    python train.py --dataset moons --resume        # continue runs/moons/ckpt.pt (same flags as the first run)
    python train.py --dataset cifar10               # the paper's CIFAR-10 run: 400k steps of batch 4096 (spec 7)
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --precision bf16 --compile
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
    python train.py --dataset cifar10 --fid-every 20000 --fid-ref refs/cifar10.npz   # FID while training
    python train.py --dataset cifar10 --bench 20 --precision bf16   # speed of the chosen config: one JSON line
    torchrun --standalone --nproc_per_node=8 train.py --dataset imagenet-latents.npz   # ImageNet-256 (README)

--dataset is cifar10, digits, mnist, a folder of images, a .npy/.npz array, or a 2-D toy (checkerboard, moons,
spirals, gaussians8); see data.py. Images train the U-Net (model.PRESETS['ddpmpp']) with the paper's CIFAR-10
settings; latents (an .npz from vae.py) train DiT-XL/2 with its ImageNet-256 settings; small images (16x16 or less,
cifar10 excepted) a small U-Net, and vectors the MLP, with settings that give good samples in a few CPU minutes
(DEFAULTS below).
--batch is the global batch: it is split across torchrun's ranks, then into micro-batches of whole groups
of M particles (gradient accumulation; M = 1 for flow matching). Everything random in a step is drawn from
generators seeded by (--seed, step), so a resumed run ends with the same weights as an uninterrupted one,
and 1 or N ranks see the same data, times and noise. Then: python sample.py --ckpt runs/moons

Reading order: main() names the phases (processes, data, settings, build, micro-batch, compile/DDP, output,
the loop, report); draw_batch() and train() are the loop; checkpoint.py is the run on disk.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import json
import os
import re
import resource
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
from data import (AUGMENT_DIM, AUGMENT_P, SIGMA_D, Dataset, UsageError, apply_augment, decode, draw_augment, encode,
                  exit_on_usage_error, load_dataset, save_image_grid, save_scatter, to_uint8)
from imm import IMMConfig, draw_times, fm_loss, imm_loss, sample, sampling_times
from model import PRESETS, build_net

# Settings that depend on the kind of data. Images: the paper's CIFAR-10 run (spec section 7, Table 5).
# Vectors (2-D toys): a 64-wide MLP on one CPU thread, 6000 steps, 1-2 minutes; k = 10, not the paper's 15, which
# trains far slower at this budget; EMA 0.99; and the paper's ImageNet parameterization euler_fm with eps = 0, not
# CIFAR-10's simple_edm, which drew thin rings as a disk and spirals without arms (docs/experiments.md, "Toy
# defaults that differ from the paper").
# Latents (SD-VAE latents, vae.py): the paper's ImageNet-256 run (spec section 7, App. I), its best model (FID 1.99
# at 8 steps): a = 2 with the second condition t - s, fp16 and r <= t - 1e-4 (App. I.6); the a = 1, s model is
# --a 1 --second-time s --min-gap 0 --precision tf32. Class-conditional when the latents have labels.
DEFAULTS = {
    'image': dict(model='ddpmpp', channels=None, iters=400_000, batch=4096, lr=1e-4, ema=0.9999,
                  log_every=100, ckpt_every=5000, sample_every=10_000, threads=0, xflip=True),
    'vector': dict(model='mlp', channels=64, k=10, param='euler_fm', iters=6000, batch=512, lr=2e-3,
                   ema=0.99, log_every=100, ckpt_every=1000, sample_every=1000, threads=1),
    'latent': dict(model='dit-xl2', channels=None, iters=1_200_000, batch=4096, lr=1e-4, ema=0.9999,
                   log_every=100, ckpt_every=5000, sample_every=10_000, threads=0,
                   param='euler_fm', k=12, a=2.0, b=4.0, second_time='t-s', min_gap=1e-4,
                   optimizer='adamw', precision='fp16', cond=True),
}
# Method, optimizer and precision settings of images and vectors alike (the paper's CIFAR-10 ones); a kind's
# DEFAULTS entry replaces them (latents do; vectors take k = 10 and euler_fm). eps follows the parameterization.
METHOD_DEFAULTS = dict(param='simple_edm', k=15, a=1.0, b=5.0, second_time='s', min_gap=0.0,
                       optimizer='radam', precision='tf32', cond=False)


def default_eps(param):
    """--eps left out: the paper's pairing, 0 with euler_fm (ImageNet, App. I) and 0.006 otherwise (CIFAR-10,
    Table 5; identity needs eps > 0). Any kind's default parameterization, or one given with --param, gets it."""
    return 0.0 if param == 'euler_fm' else 0.006


OPTIMIZERS = {'radam': torch.optim.RAdam, 'adamw': torch.optim.AdamW}   # both: betas (0.9, 0.999), eps 1e-8, no decay
# Small images (a side of SMALL_IMAGE or less: the 8x8 digits, a user's own small set) on a CPU: a small U-Net,
# ~5 minutes on 2 cores to recognisable digits at 1 and 2 steps (docs/experiments.md, "Digits"). k = 10: with the
# paper's 15 the 1-step samples were still grey blurs after 1500 steps, and k = 10 after 500 steps looked better
# than k = 15 after 1500. No x-flip: handwriting, and many small sets, are not mirror-symmetric. cifar10 and
# larger images keep the paper's settings.
SMALL_IMAGE = 16
DEFAULTS['small image'] = dict(model='small', channels=None, iters=1500, batch=128, lr=1e-3, ema=0.995,
                               log_every=100, ckpt_every=500, sample_every=500, threads=1, xflip=False, k=10)
# Dense peak TFLOP/s of one GPU per --precision, for MFU (H200: the H100 SXM chip with more memory).
PEAK_TFLOPS = {'H100': dict(bf16=989, fp16=989, tf32=495, fp32=67),
               'H200': dict(bf16=989, fp16=989, tf32=495, fp32=67)}
SAMPLES_SHOWN = {'image': 64, 'vector': 10_000, 'latent': 64}   # images in a grid / points in a scatter picture
BENCH_WARMUP = 3                                  # untimed steps before --bench timing (compile, autotuning)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train an IMM generator (see the module docstring).')
    add = p.add_argument
    # data
    add('--dataset', default='cifar10',
        help='cifar10, digits, mnist, a folder of images, a .npy/.npz file (images, vectors, or latents from vae.py), '
             'or a toy: checkerboard, moons, spirals, gaussians8')
    add('--data-dir', default='data', help='where cifar10 and mnist are kept (downloaded there if missing)')
    add('--resolution', type=int, help='crop and resize images to this side (default: their own size)')
    add('--xflip', action=argparse.BooleanOptionalAction,
        help='random horizontal flips of images, not of latents or vectors (default: on, off for small images; '
             'with --augment > 0, its labelled x-flip takes their place)')
    add('--augment', type=float,
        help="probability p of EDM's non-leaking augmentation (paper Table 5 lists it for CIFAR-10 and states no p; "
             "default: EDM's CIFAR-10 value 0.12 for cifar10, 0 elsewhere)")
    add('--cond', action=argparse.BooleanOptionalAction,
        help='class-conditional training on the dataset labels (default: on for labelled latents, else off)')
    add('--label-dropout', type=float, default=0.1,
        help='with --cond, probability of replacing a label by the null class (for guidance)')
    add('--workers', type=int, default=min(8, os.cpu_count() or 1), help='processes that decode an image folder')
    # network
    add('--model', choices=sorted(PRESETS),
        help='network preset from model.PRESETS (default: ddpmpp for images, small for small images, mlp for vectors, '
             'dit-xl2 for latents)')
    add('--channels', type=int,
        help="width: U-Net model_channels, DiT hidden_size, MLP hidden (default: the preset's; 64 for vectors)")
    add('--dropout', type=float, help="override the preset's dropout (ddpmpp: 0.2, the paper's)")
    # method (imm.IMMConfig; spec sections 2-5)
    add('--loss', choices=['imm', 'fm'], default='imm',
        help='imm: moment matching (Eq. 12); fm: the flow-matching baseline with the same net')
    add('--particles', type=int, default=4, help='M, samples per group sharing (s, r, t); 1 = consistency training')
    add('--schedule', choices=['fm', 'cosine'], default='fm', help='noise schedule alpha_t, sigma_t (spec 2)')
    add('--param', choices=['simple_edm', 'euler_fm', 'identity'],
        help='parameterization c_skip, c_out of f_{s,t} (spec 4; default: simple_edm for images, euler_fm for '
             'vectors and latents)')
    add('--k', type=int,
        help="r(s,t) steps eta by (eta_max - eta_min) / 2^k (default: the paper's 15 for images, 10 for small images "
             "and vectors, 12 for latents)")
    add('--a', type=float, help='time weighting exponent on alpha_t (Eq. 13; default: 1, 2 for latents)')
    add('--b', type=float, help='time weighting sigmoid shift (Eq. 13; default: 5, 4 for latents)')
    add('--eps', type=float,
        help='smallest time, where sampling ends; 0 is allowed except with --param identity '
             '(default: 0 with euler_fm, 0.006 otherwise)')
    add('--T', type=float, help='largest time, where sampling starts (default: 0.994 for fm, 0.996 for cosine)')
    add('--second-time', choices=['s', 't-s'],
        help='second network condition: 1000 s or 1000 (t - s) (default: s, t-s for latents)')
    add('--min-gap', type=float,
        help='keep r <= t - min_gap (App. I.6: 1e-4 with fp16); 0 = off (default: 0, 1e-4 for latents)')
    add('--target-fp32', action=argparse.BooleanOptionalAction, default=True,
        help='run the stop-gradient target pass in fp32 under bf16/fp16')
    # optimisation
    add('--iters', type=int, help='optimizer steps (default: 400k for images, 1500 for small images, 6000 for vectors)')
    add('--batch', type=int,
        help='global batch, split across ranks and micro-batches (default: 4096 for images, 128 for small images, '
             '512 for vectors)')
    add('--micro-batch', default='auto',
        help='rows per forward/backward on each rank, a multiple of M; auto: the per-rank batch, halved until it fits')
    add('--optimizer', choices=sorted(OPTIMIZERS),
        help='RAdam (the paper\'s CIFAR-10) or AdamW (its ImageNet), betas (0.9, 0.999), no weight decay '
             '(default: radam, adamw for latents)')
    add('--lr', type=float,
        help='learning rate (default: 1e-4 for images and latents, 1e-3 for small images, 2e-3 for vectors)')
    add('--ema', type=float,
        help='EMA decay per step (default: 0.9999 for images and latents, 0.995 for small images, 0.99 for vectors)')
    add('--grad-clip', type=float, default=0.0, help='clip the gradient norm to this value; 0 = off')
    add('--seed', type=int, default=0, help='seeds the weights and every random draw of training')
    # system
    add('--device', help='cpu or cuda (default: cuda when available); torchrun ranks use cuda:LOCAL_RANK')
    add('--precision', choices=['fp32', 'tf32', 'bf16', 'fp16'],
        help='fp32; TF32 matmuls (paper); bf16 or fp16 autocast (fp16 with a grad scaler) '
             '(default: tf32, fp16 for latents as App. I.6)')
    add('--threads', type=int,
        help="CPU threads for torch; 0 = torch's default (default: 1 for vectors, where more only add overhead, "
             "and for small images)")
    add('--compile', action='store_true', help='torch.compile the network (eager, with a warning, if it fails)')
    # output
    add('--out', help='output folder (default: runs/<dataset>)')
    add('--init-from', help="start from the EMA weights of a train.py checkpoint or of the authors' released "
                              "cifar10.pt (their network and its settings); the optimizer starts fresh")
    add('--resume', nargs='?', const='',
        help='continue from a checkpoint (default: <out>/ckpt.pt); pass the flags of the first run')
    add('--log-every', type=int, help='steps between progress lines and log.jsonl entries (default 100)')
    add('--ckpt-every', type=int,
        help='steps between checkpoints (default: 5000 for images, 500 for small images, 1000 for vectors)')
    add('--sample-every', type=int,
        help='steps between pictures of 1- and 2-step EMA samples; 0 = never '
             '(default: 10000 images, 500 small images, 1000 vectors)')
    add('--fid-every', type=int, default=0, help='steps between FID evaluations of the EMA at 1 and 2 steps; 0 = off')
    add('--fid-n', type=int, default=10_000, help='generated images per FID evaluation')
    add('--fid-ref', help='reference statistics .npz (keys mu, sigma) from `python fid.py ref`')
    add('--fid-weights', help='Inception weights file for FID offline (default: downloaded once)')
    add('--bench', type=int, default=0,
        help='time this many steps (after warm-up) on the chosen config, print one JSON line, write nothing')
    add('--peak-tflops', type=float, help='peak TFLOP/s of one device for MFU in --bench (default: known GPUs)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_processes(args)
    say = print if rank == 0 else (lambda *a, **k: None)   # only rank 0 talks and writes
    data = load_data(args, rank, world)
    init = checkpoint.load_for_sampling(checkpoint.file_of(args.init_from), flag='--init-from')[:2] \
        if args.init_from else None                         # (network, IMMConfig) to start from
    args, cfg, net_config, M, micro = resolve_settings(args, data, world, init and init[0].config)
    if init and init[1] != cfg:                            # fine-tuning with other method settings is allowed
        differences = checkpoint.config_differences(dataclasses.asdict(init[1]), dataclasses.asdict(cfg), 'imm_config')
        say(f"note: --init-from {args.init_from} was trained with other settings: {'; '.join(differences)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast, scaler = set_precision(args.precision, device)
    net, ema, opt, start_step, best_fid = build(args, cfg, net_config, scaler, device, data.kind, init)
    per_rank = args.batch // world
    if micro == 'auto':
        micro = fit_micro_batch(net, data, cfg, args, M, per_rank, autocast, device, world > 1)
    model = compile_net(net, data, cfg, args, micro, autocast, device) if args.compile else net
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                  broadcast_buffers=False) if world > 1 else None
    fid = set_up_fid(args, device) if args.fid_every and rank == 0 else None
    pictures = prepare_output(args, data, cfg, start_step, device) if rank == 0 and args.out else None
    say(f"{data.name}: {data.kind} {list(data.x.shape[1:])} x {len(data.x)}"
        f"{f', {net.num_classes} classes' if net.num_classes else ''} | {net_config['arch']} {args.model} "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params | {args.loss} M={M} | batch {args.batch} = "
        f"{world} rank(s) x {per_rank // micro} x {micro} | {device} {args.precision}"
        f"{' compiled' if model is not net else ''} | steps {start_step}->{args.iters} | {args.out or 'bench'}")

    run = SimpleNamespace(  # everything the loop reads and updates
        args=args, cfg=cfg, rank=rank, world=world, device=device, say=say, M=M, micro=micro,
        num_micro=per_rank // micro, data=dataclasses.replace(data, x=data.x.to(device), labels=None
                                                            if data.labels is None else data.labels.to(device)),
        net=net, ema=ema, opt=opt, scaler=scaler, autocast=autocast, model=ddp or model, ddp=ddp, fid=fid,
        pictures=pictures, log_file=None if pictures is None else open(os.path.join(args.out, 'log.jsonl'), 'a'),
        best_fid=best_fid, start_step=start_step, last_good=None, stop=[],
        loss_sum=torch.zeros((), device=device),           # summed on the device; read only when logging
        bad_step=torch.full((), -1, device=device),        # first step with a non-finite loss, -1 if none
        t_last=time.time(), step_last=start_step)

    def request_stop(signum, frame):                       # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        run.stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)              # a second signal stops at once
    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    first = start_step
    if args.bench:                                         # untimed warm-up steps, then the timer
        train(run, first, first + BENCH_WARMUP)
        first += BENCH_WARMUP
        synchronize(device, reset_peak_memory=True)
    started = time.time()
    status = train(run, first, args.iters)
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)

    if args.bench:
        synchronize(device)
        report_bench(run, model is not net, (time.time() - started) / args.bench)
    elif status == 0 and not run.stop:
        say(f"done: {os.path.join(args.out, 'ckpt.pt')} at step {args.iters}. "
            f"Sample with: python sample.py --ckpt {args.out}")
    if run.log_file is not None:
        run.log_file.close()
    if world > 1:  # tear down together, DDP first: gloo work it still holds at interpreter exit aborts the rank
        run.model = run.ddp = ddp = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return status


# ---- Set-up, one function per phase of main()

def init_processes(args):
    """(rank, world size, device): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1."""
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
    return rank, world, device


def load_data(args, rank, world):
    """The dataset (rank 0 first: it may download CIFAR-10); --bench on cifar10 times synthetic images."""
    if args.bench and args.dataset == 'cifar10':
        side = args.resolution or 32
        return Dataset('cifar10', 'image', torch.randint(0, 256, (4096, 3, side, side), dtype=torch.uint8),
                       torch.randint(0, 10, (4096,)), 10)
    if world > 1 and rank != 0:
        dist.barrier()
    data = load_dataset(args.dataset, args.data_dir, args.resolution, args.workers)
    if world > 1 and rank == 0:
        dist.barrier()
    return data


def resolve_settings(args, data, world, init_config=None):
    """From the flags, the data and the number of ranks to everything the run is (no side effects):
    (args with the data kind's defaults filled in, IMMConfig, network config, M rows per group, micro-batch
    or 'auto'). Every range check is here, so bad flags stop the run before anything is built or written.
    init_config: the net config of --init-from's network, which then replaces --model and --channels.
    --bench is a configuration: no output folder, nothing logged or saved, warm-up plus timed steps."""
    args = argparse.Namespace(**vars(args))
    small = data.kind == 'image' and max(data.x.shape[2:]) <= SMALL_IMAGE and args.dataset != 'cifar10'
    if args.cond is None and data.num_classes == 0:       # conditional by default only where there are labels
        args.cond = False
    for key, value in {**METHOD_DEFAULTS, **DEFAULTS['small image' if small else data.kind]}.items():   # left to the data
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eps is None:
        args.eps = default_eps(args.param)
    if args.augment is None:                               # EDM's CIFAR-10 value, where the network can take it
        takes_labels = init_config is None or init_config.get('augment_dim', 0) == AUGMENT_DIM
        args.augment = AUGMENT_P if args.dataset == 'cifar10' and takes_labels else 0.0
    if args.cond and data.num_classes == 0:
        raise UsageError(f"--cond: dataset {args.dataset!r} has no labels; leave out --cond, or use a labelled dataset "
                         f"(cifar10, a toy, a folder with one sub-folder per class, an .npz with 'labels')")
    if args.T is None:
        args.T = 0.994 if args.schedule == 'fm' else 0.996
    try:
        cfg = IMMConfig(schedule=args.schedule, param=args.param, particles=args.particles, k=args.k, a=args.a,
                        b=args.b, eps=args.eps, T=args.T, sigma_d=SIGMA_D, second_time=args.second_time,
                        min_gap=args.min_gap, target_fp32=args.target_fp32)
    except ValueError as e:
        raise UsageError(re.sub(r'IMMConfig\.(\w+)=', lambda m: f"--{m.group(1).replace('_', '-')} ", str(e))) from None
    net_config = network_config(args, data, init_config)
    M = cfg.particles if args.loss == 'imm' else 1        # flow matching: every row is its own group
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
            ('augment', 0 <= args.augment <= 1 and (args.augment == 0 or data.kind == 'image'),
             'a probability in [0, 1] for images, 0 for vectors and latents'),
            ('threads', args.threads >= 0, "an integer >= 0 (0 = torch's default)")]:
        if not ok:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: accepted {accepted}")
    if args.batch % (M * world):
        raise UsageError(f"--batch {args.batch} must be divisible by M x ranks = {M} x {world} = {M * world}, "
                         f"so that every rank gets whole groups of M particles (--particles {M}); "
                         f"e.g. --batch {(args.batch // (M * world) + 1) * M * world}")
    per_rank, micro = args.batch // world, args.micro_batch
    if micro != 'auto':
        micro = int(micro) if re.fullmatch(r'\d+', micro) else 0
        if micro < 1 or micro % M or per_rank % micro:
            raise UsageError(f"--micro-batch {args.micro_batch}: accepted 'auto' or a multiple of M={M} that divides "
                             f"the per-rank batch {per_rank} (--batch {args.batch} over {world} ranks)")
    if args.fid_every and data.kind != 'image':
        hint = '; score latents once sample.py has decoded them (fid.py calc)' if data.kind == 'latent' else ''
        raise UsageError(f"--fid-every {args.fid_every}: FID needs images, {args.dataset!r} holds {data.kind}s{hint}")
    if args.fid_every and not (args.fid_ref and os.path.isfile(args.fid_ref)):
        raise UsageError(f"--fid-ref {args.fid_ref}: no such file; --fid-every needs reference statistics, "
                         f"made with: python fid.py ref --dataset {args.dataset} --out refs/stats.npz")
    if args.init_from and args.resume is not None:
        raise UsageError(f"--init-from {args.init_from} and --resume: give one; --resume continues a run, "
                         f"--init-from starts a new one from a network's weights")
    args.out = args.out or os.path.join('runs', os.path.splitext(os.path.basename(args.dataset.rstrip('/\\')))[0])
    if args.bench:
        args.out = args.resume = None
        args.iters = BENCH_WARMUP + args.bench
        args.log_every = args.ckpt_every = args.sample_every = args.fid_every = 0
    return args, cfg, net_config, M, micro


def network_config(args, data, init_config=None):
    """model.build_net's argument: --model's preset (or --init-from's network) fitted to the data's shape,
    --channels, --dropout, and the augmentation-label input that --augment needs."""
    shape = list(data.x.shape[1:])
    if init_config is not None:
        return init_network_config(args, data, init_config)
    if args.model not in PRESETS:                          # the latents' default, dit-xl2, names a preset of model.py
        raise UsageError(f"--model {args.model}: not a preset of model.PRESETS; accepted: {', '.join(PRESETS)}")
    net_config = dict(PRESETS[args.model], num_classes=data.num_classes if args.cond else 0)
    if net_config['arch'] in ('unet', 'dit'):             # image-shaped data: pixels or latents
        if net_config['arch'] == 'unet':
            net_config['augment_dim'] = AUGMENT_DIM if args.augment else 0
        if data.kind == 'vector':
            name = {'unet': 'U-Net', 'dit': 'DiT'}[net_config['arch']]
            raise UsageError(f"--model {args.model} is a {name} for images, but {args.dataset!r} holds vectors "
                             f"{shape}; use --model mlp")
        net_config.update(img_resolution=shape[1], in_channels=shape[0])
        if args.channels:
            net_config['model_channels' if net_config['arch'] == 'unet' else 'hidden_size'] = args.channels
    else:
        if data.kind != 'vector':
            raise UsageError(f"--model {args.model} is an MLP for vectors, but {args.dataset!r} holds {data.kind}s "
                             f"{shape}; use a U-Net or DiT preset: {', '.join(k for k in PRESETS if k != args.model)}")
        net_config['dim'] = shape[0]
        if args.channels:
            net_config['hidden'] = args.channels
    if args.dropout is not None:
        net_config['dropout'] = args.dropout
    return net_config


def init_network_config(args, data, config):
    """--init-from: the file's network as it is (only --dropout may change; --model and --channels are not used),
    checked against the data and the flags."""
    config = dict(config, **({} if args.dropout is None else {'dropout': args.dropout}))
    takes = [config['in_channels'], config['img_resolution'], config['img_resolution']] \
        if config['arch'] in ('unet', 'dit') else [config['dim']]
    pairs = {'data shape': (takes, list(data.x.shape[1:])),
             'classes (--cond)': (config['num_classes'], data.num_classes if args.cond else 0),
             'augment_dim (--augment)': (config.get('augment_dim', 0), AUGMENT_DIM if args.augment else 0)}
    problems = [f"{name}: the network's {a}, this run's {b}" for name, (a, b) in pairs.items() if a != b]
    if problems:
        raise UsageError(f"--init-from {args.init_from}: its network does not fit this run ({'; '.join(problems)})")
    return config


def set_precision(precision, device):
    """(autocast context, grad scaler) for --precision; TF32 matmuls and convolutions only under tf32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'tf32'
    torch.backends.cudnn.benchmark = True
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else contextlib.nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == 'fp16')


def build(args, cfg, net_config, scaler, device, kind, init=None):
    """(net, EMA, optimizer, first step, best FID so far): fresh from --seed (or --init-from's weights, init), or the
    state of --resume's checkpoint. A checkpoint of another config, or a run already in --out without --resume,
    is refused before any write."""
    ckpt_path = args.out and os.path.join(args.out, 'ckpt.pt')
    torch.manual_seed(args.seed)                           # the initial weights (replaced when resuming)
    net = build_net(net_config)
    if init is not None:
        checkpoint.load_weights(net, init[0].state_dict(), f'--init-from {args.init_from}')
    ckpt = None
    if args.resume is not None:
        ckpt = checkpoint.read(args.resume or ckpt_path)
        checkpoint.check_resumable(ckpt, args.resume or ckpt_path, net.config, cfg, args.loss, args.optimizer)
    elif ckpt_path and os.path.exists(ckpt_path):
        raise UsageError(f"{args.out!r} already holds a run ({ckpt_path}); continue it with --resume, "
                         f"or start a new one with another --out")
    net = net.to(device)
    if device.type == 'cuda' and kind == 'image':
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = OPTIMIZERS[args.optimizer]
    fused = {'fused': True} if 'fused' in inspect.signature(optimizer).parameters and device.type == 'cuda' \
        else {'foreach': device.type == 'cuda'}            # one kernel per op for all tensors
    opt = optimizer(net.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0, **fused)
    if ckpt is None:
        return net, ema, opt, 0, None
    net.load_state_dict(ckpt['net'])
    ema.load_state_dict(ckpt['ema'])
    opt.load_state_dict(ckpt['opt'])
    for group in opt.param_groups:                         # --lr may change on resume
        group['lr'] = args.lr
    if ckpt['scaler'] is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    checkpoint.set_rng_state(ckpt['rng'])
    return net, ema, opt, ckpt['step'], ckpt.get('best_fid')


def trial_step(model, data, cfg, args, rows, autocast, device):
    """One forward/backward on `rows` synthetic rows, gradients dropped: checks that a micro-batch fits and compiles."""
    M = cfg.particles if args.loss == 'imm' else 1
    t, s = draw_times(rows // M, cfg, device=device)
    x = torch.zeros(rows, *data.x.shape[1:], device=device)
    labels = torch.zeros(rows, dtype=torch.long, device=device) if args.cond else None
    augment_labels = torch.zeros(rows, AUGMENT_DIM, device=device) if args.augment else None
    micro_loss(model, x, cfg.sigma_d * torch.randn_like(x), t, s, labels, augment_labels, cfg, args.loss,
               autocast).backward()
    model.zero_grad(set_to_none=True)


def fit_micro_batch(net, data, cfg, args, M, per_rank, autocast, device, distributed):
    """--micro-batch auto: the per-rank batch, halved (to a multiple of M that divides it) until a step fits
    in GPU memory; on a CPU the whole per-rank batch. All ranks take the smallest that fits on any."""
    micro = per_rank
    while device.type == 'cuda':
        try:
            trial_step(net, data, cfg, args, micro, autocast, device)
            break
        except torch.cuda.OutOfMemoryError:
            pass                                           # retried below, once the exception has let go of its memory
        net.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        smaller = [m for m in range(M, micro // 2 + 1, M) if per_rank % m == 0]
        if not smaller:
            raise UsageError(f"--micro-batch auto: even {micro} rows (M={M}) do not fit in GPU memory; "
                             f"use a smaller --model / --channels or --precision bf16")
        micro = smaller[-1]
    if distributed:                                        # every rank must use the same split
        agreed = torch.tensor([micro], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        micro = int(agreed.item())
    return micro


def compile_net(net, data, cfg, args, micro, autocast, device):
    """torch.compile(net), tried on one micro-batch; the eager net, with a warning, if compiling fails."""
    try:
        model = torch.compile(net)
        trial_step(model, data, cfg, args, micro, autocast, device)
        return model
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"warning: torch.compile failed ({type(e).__name__}: {reason}); training without it", file=sys.stderr)
        net.zero_grad(set_to_none=True)
        return net


def set_up_fid(args, device):
    """The Inception network and the reference statistics for --fid-every (rank 0 only)."""
    from fid import InceptionFeatures, load_ref
    return SimpleNamespace(inception=InceptionFeatures(args.fid_weights).to(device), ref=load_ref(args.fid_ref))


def prepare_output(args, data, cfg, start_step, device):
    """Create --out/samples, cut log.jsonl back to the resumed step, and fix the noise (and labels) of the
    pictures; for 2-D data, draw the data itself on the axes the samples will use."""
    os.makedirs(os.path.join(args.out, 'samples'), exist_ok=True)
    if start_step:
        checkpoint.trim_log(os.path.join(args.out, 'log.jsonl'), start_step)
    shown, num_classes = SAMPLES_SHOWN[data.kind], data.num_classes if args.cond else 0
    fixed = torch.Generator().manual_seed(args.seed)
    noise = (cfg.sigma_d * torch.randn(shown, *data.x.shape[1:], generator=fixed)).to(device)
    labels = (torch.arange(shown) % num_classes).to(device) if num_classes else None
    extent = None
    if data.kind == 'vector':
        real = decode(data.x[torch.randperm(len(data.x), generator=fixed)[:shown]], data)
        lo, hi = float(real[:, :2].min()), float(real[:, :2].max())
        extent = (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        save_scatter(real, os.path.join(args.out, 'data.png'), extent)
    return SimpleNamespace(noise=noise, labels=labels, extent=extent)


# ---- The loop

def draw_batch(step, data, args, cfg, rank=0, world=1):
    """Everything random in global batch `step`, as this rank's share: (x, noise, t, s, labels, augment_labels).

    Rows, times, flips, noise and dropped labels come from one generator seeded by (--seed, step) and are drawn
    for the whole batch, of which each rank keeps its slice: 1 or N ranks, and a resumed run, see the same batch.
    t and s are one per group of M rows (one per row for flow matching). With --augment p > 0, EDM's augmentation
    (data.draw_augment, apply_augment) replaces the plain x-flip, and its labels go to the network; otherwise
    augment_labels is None. The global RNG, which draws dropout masks, is seeded by (--seed, step, rank)."""
    M = cfg.particles if args.loss == 'imm' else 1
    per_rank, device = args.batch // world, data.x.device
    mine = slice(rank * per_rank, (rank + 1) * per_rank)                 # this rank's rows ...
    my_groups = slice(rank * per_rank // M, (rank + 1) * per_rank // M)  # ... and its groups of M rows
    gen = torch.Generator(device).manual_seed(seed_for(args.seed, 1, step))
    torch.manual_seed(seed_for(args.seed, 2, step, rank))
    rows = batch_rows(step, args.batch, len(data.x), args.seed, device)[mine]
    t, s = (v[my_groups] for v in draw_times(args.batch // M, cfg, generator=gen, device=device))
    x, augment_labels = data.x[rows], None
    if data.kind == 'image':
        x = encode(x)
        if args.augment:
            x, augment_labels = apply_augment(x, draw_augment(args.batch, args.augment, gen)[mine])
        elif args.xflip:
            flip = torch.rand(args.batch, generator=gen, device=device)[mine] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if device.type == 'cuda':
            x = x.contiguous(memory_format=torch.channels_last)
    elif data.kind == 'latent':                            # float16 in memory; no flips (the paper's ImageNet run)
        x = x.float()
    noise = cfg.sigma_d * torch.randn(args.batch, *x.shape[1:], generator=gen, device=device)[mine]
    labels = None
    if args.cond:
        drop = torch.rand(args.batch, generator=gen, device=device)[mine] < args.label_dropout
        labels = torch.where(drop, data.num_classes, data.labels[rows])
    return x, noise, t, s, labels, augment_labels


def train(run, first, last):
    """Optimizer steps first .. last - 1. Returns 0, or 1 when the loss became non-finite."""
    args, cfg, device = run.args, run.cfg, run.device
    for step in range(first, last):
        if run.stop:
            run.say(f"stopped by signal {run.stop[0]} at step {step}")
            if int(run.bad_step) < 0 and run.rank == 0 and args.out:
                save(run, step)
                run.say(f"wrote {os.path.join(args.out, 'ckpt.pt')} (step {step}); "
                        f"continue with the same command plus --resume")
            return 0
        x, noise, t, s, labels, augment_labels = draw_batch(step, run.data, args, cfg, run.rank, run.world)

        # Forward/backward per micro-batch of whole groups; all but the last skip DDP's all-reduce (no_sync).
        step_loss = torch.zeros((), device=device)
        for i in range(run.num_micro):
            r = slice(i * run.micro, (i + 1) * run.micro)                           # rows ...
            g = slice(i * run.micro // run.M, (i + 1) * run.micro // run.M)         # ... and their groups
            last_micro = run.ddp is None or i == run.num_micro - 1
            with contextlib.nullcontext() if last_micro else run.ddp.no_sync():
                loss = micro_loss(run.model, x[r], noise[r], t[g], s[g], None if labels is None else labels[r],
                                  None if augment_labels is None else augment_labels[r], cfg, args.loss,
                                  run.autocast) / run.num_micro
                run.scaler.scale(loss).backward()
            step_loss += loss.detach()
        if args.grad_clip:
            run.scaler.unscale_(run.opt)
            torch.nn.utils.clip_grad_norm_(run.net.parameters(), args.grad_clip)
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        with torch.no_grad():                              # EMA: ema += (1 - decay) (net - ema), one fused op
            torch._foreach_lerp_(list(run.ema.parameters()), list(run.net.parameters()), 1 - args.ema)
        run.loss_sum += step_loss
        run.bad_step = torch.where((run.bad_step < 0) & ~torch.isfinite(step_loss), step + 1, run.bad_step)
        if housekeeping(run, step + 1):
            return 1
    return 0


def micro_loss(model, x, noise, t, s, labels, augment_labels, cfg, loss, autocast):
    """The training loss of one micro-batch: IMM (Eq. 12; t, s one per group of M rows) or flow matching."""
    with autocast:
        if loss == 'imm':
            return imm_loss(model, x, noise, t, s, cfg, labels, augment_labels)
        return fm_loss(model, x, noise, t, cfg, labels, augment_labels)


def housekeeping(run, done):
    """Log, pictures, FID and checkpoint on the steps that ask for them (only those read the device).
    Returns True, having said so, when the loss has become non-finite: the last checkpoint stays intact."""
    args = run.args
    due = lambda every: every and (done % every == 0 or done == args.iters)
    if not any(due(every) for every in (args.log_every, args.ckpt_every, args.sample_every, args.fid_every)):
        return False
    if run.world > 1:                                      # every rank stops together
        dist.all_reduce(run.bad_step, op=dist.ReduceOp.MAX)
    if int(run.bad_step) >= 0:
        last_good = run.last_good or run.start_step
        kept = f"the last good checkpoint, {os.path.join(args.out, 'ckpt.pt')} (step {last_good}), is intact" \
            if last_good else "no checkpoint was written"
        if run.rank == 0:
            print(f"error: the loss became non-finite at step {int(run.bad_step)}; stopping. {kept}. "
                  f"Try a lower --lr, --grad-clip 1, or --precision fp32.", file=sys.stderr)
        return True
    if due(args.log_every):
        log(run, done)
    if due(args.sample_every) and run.rank == 0:
        save_pictures(run, done)
    if due(args.fid_every):
        evaluate_fid(run, done)
    if due(args.ckpt_every) and run.rank == 0:
        save(run, done)
        run.last_good = done
    return False


def log(run, done):
    """The mean loss since the last log line, speed and ETA: one progress line, one log.jsonl entry."""
    args = run.args
    if run.world > 1:
        dist.all_reduce(run.loss_sum)
    mean_loss = run.loss_sum.item() / (done - run.step_last) / run.world
    run.loss_sum.zero_()
    sec = (time.time() - run.t_last) / (done - run.step_last)
    eta = sec * (args.iters - done)
    run.say(f"step {done}/{args.iters} | loss {mean_loss:.4g} | {args.batch / sec:.0f} img/s | {sec:.3f} s/step | "
            f"ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s", flush=True)
    write_log(run, {'step': done, 'loss': mean_loss, 'img_per_s': args.batch / sec, 'sec_per_step': sec,
                    'eta_s': eta, 'time': time.time()})
    run.t_last, run.step_last = time.time(), done


def write_log(run, entry):
    if run.log_file is not None:
        run.log_file.write(json.dumps(entry) + '\n')
        run.log_file.flush()


def save_pictures(run, done):
    """1- and 2-step samples of the EMA from the fixed noise: an image grid, or a 2-D density picture."""
    for steps in (1, 2):
        x0 = sample(run.ema, run.pictures.noise, sampling_times(steps, run.cfg), run.cfg, run.pictures.labels,
                    denoiser=run.args.loss == 'fm')
        path = os.path.join(run.args.out, 'samples', f'{done:07d}-{steps}step.png')
        if run.data.kind == 'latent':  # no VAE while training: latent channels 0-2 (or 0), +-2 std, as RGB (grey)
            save_image_grid(decode(x0[:, :3] if x0.shape[1] >= 3 else x0[:, :1], SimpleNamespace(kind='image')), path)
        elif run.data.kind == 'image':
            save_image_grid(decode(x0, run.data), path)
        else:
            save_scatter(decode(x0, run.data), path, run.pictures.extent)


def evaluate_fid(run, done):
    """FID of --fid-n EMA samples at 1 and 2 steps (rank 0; the others wait); keeps the best as ckpt-best.pt."""
    if run.rank == 0:
        fids = {steps: ema_fid(run, steps) for steps in (1, 2)}
        run.say(f"step {done} | FID-{run.args.fid_n // 1000}k 1-step {fids[1]:.3f} | 2-step {fids[2]:.3f}", flush=True)
        write_log(run, {'step': done, 'fid_1step': fids[1], 'fid_2step': fids[2]})
        if run.best_fid is None or fids[2] < run.best_fid:
            run.best_fid = fids[2]
            save(run, done, 'ckpt-best.pt')
    if run.world > 1:
        dist.barrier()


def ema_fid(run, steps):
    """FID of --fid-n samples of the EMA net at `steps` steps; the same noise (and labels) at every evaluation."""
    from fid import fid_of_sampler
    args, cfg, device = run.args, run.cfg, run.device
    noise_gen = torch.Generator(device).manual_seed(seed_for(args.seed, 3))
    num_classes = run.net.num_classes

    def generate(b):
        z = cfg.sigma_d * torch.randn(b, *run.data.x.shape[1:], generator=noise_gen, device=device)
        labels = torch.randint(num_classes, (b,), generator=noise_gen, device=device) if num_classes else None
        with run.autocast:
            x0 = sample(run.ema, z, sampling_times(steps, cfg), cfg, labels, denoiser=args.loss == 'fm')
        return to_uint8(x0)
    return fid_of_sampler(generate, args.fid_n, run.fid.ref, net=run.fid.inception)


def save(run, step, name='ckpt.pt'):
    checkpoint.save(os.path.join(run.args.out, name), checkpoint.make(
        run.net, run.ema, run.opt, run.scaler, step, run.args, run.cfg, run.data, run.best_fid))


# ---- Helpers of the loop and of --bench

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


def synchronize(device, reset_peak_memory=False):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        if reset_peak_memory:
            torch.cuda.reset_peak_memory_stats(device)


def forward_flops(net, shape, num_classes, device):
    """FLOPs of one network forward per sample, counted by torch (FlopCounterMode) on a forward of 2 samples."""
    x = torch.zeros(2, *shape, device=device)
    c = torch.full((2,), 500.0, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device) if num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, c, c, labels)
    return counter.get_total_flops() / 2


def report_bench(run, compiled, step_s):
    """--bench: one JSON line of speed (img/s, s/step), peak memory, counted TFLOP/s and MFU per device."""
    args, net, device = run.args, run.net, run.device
    fwd_flops = forward_flops(net, list(run.data.x.shape[1:]), net.num_classes, device)
    passes = 4 if args.loss == 'imm' else 3                # forward passes' worth: IMM 2 forward + backward
    tflops = fwd_flops * passes * args.batch / step_s / 1e12 / run.world                       # per device
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    peak = args.peak_tflops or next((v[args.precision] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in net.parameters())
    run.say(json.dumps({'img_per_s': round(args.batch / step_s, 2), 'step_s': round(step_s, 5),
                        'peak_mem_gb': round(peak_mem / 2 ** 30, 3), 'tflops': round(tflops, 3),
                        'mfu': round(tflops / peak, 4) if peak else None, 'peak_tflops': peak,
                        'fwd_gflops_per_sample': float(f"{fwd_flops / 1e9:.4g}"),
                        'device': gpu or str(device), 'world_size': run.world, 'precision': args.precision,
                        'compiled': compiled, 'model': args.model, 'params_m': round(params / 1e6, 3),
                        'loss': args.loss, 'batch': args.batch, 'micro_batch': run.micro, 'steps': args.bench}),
            flush=True)


if __name__ == '__main__':
    with exit_on_usage_error():
        sys.exit(main())
