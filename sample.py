"""
Draw samples from a trained IMM checkpoint: a few applications of the one-step map f_{s,t}, from noise
at t = T down to data at t = eps (paper Sec. 4.3, Algorithm 2; docs/method.md section 5).

    python sample.py --steps 2                  # newest runs/*/ckpt.pt -> samples.npz + samples.png beside it
    python sample.py --ckpt runs/cifar10/ckpt.pt --steps 1 --num-samples 50000 --out fid/imm-1step.npz   # for FID
    torchrun --standalone --nproc_per_node=8 sample.py --ckpt runs/cifar10 --num-samples 50000 --out fid/imm.npz
    python sample.py --ckpt hf://lumaai/imm/cifar10.pt --steps 1   # the authors' release, downloaded once
    python sample.py --times 0.994,0.5833,0.006 # an explicit time grid instead of --steps
    python sample.py --guidance 1.5 --class 3   # class-conditional checkpoints (CFG, Eq. 14)
    python sample.py --bench --model ddpmpp --precision bf16 --compile   # speed only: prints one JSON line
    python sample.py --ckpt runs/imagenet-latents --steps 8   # latents: guidance 1.5, decoded by the SD VAE

The .npz holds arr_0, uint8 images [N, H, W, C] (the layout the ADM/EDM evaluation tools read), and for
class-conditional nets arr_1, int64 labels [N]; for vector data arr_0 is float32 [N, D] in the data's own
units. A latent checkpoint's samples are decoded by the VAE that encoded its data (vae.py, diffusers; --vae
overrides it) into uint8 images, as above.

Defaults follow the authors' release for the kind of checkpoint in hand (settings.SAMPLING, printed first):
images (CIFAR-10) sample 2 steps with eta(t1) = 1.4 and no guidance; latents (ImageNet) sample a uniform grid in t
at every step count and, when class-conditional, guidance 1.5. --times and --guidance override them.

Sample i's noise (and label) is the i-th draw from a generator seeded with --seed, so the first n samples are the
same whatever --batch, --num-samples or the number of processes is. Under torchrun every rank draws the inputs of
every batch and runs the network on batches rank, rank + N, ...; rank 0 gathers them in order and writes the one
.npz, the same as a single process writes. --restart re-noises batch j from a generator seeded by (--seed, j).
"""
import argparse
import contextlib
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import settings
from authors import DEFAULT_VAE
from data import decode, save_image_grid, save_scatter
from imm import IMMConfig, sample, sampling_times
from model import PRESETS, build_net
from util import Progress, UsageError, exit_on_usage_error, write_atomically
from vae import decode_latents, load_vae

GRID = 64  # images shown in the PNG; all samples go to the .npz
KIND_OF_ARCH = {'unet': 'image', 'mlp': 'vector', 'dit': 'latent'}  # --bench --model: the preset's kind of data


def newest_checkpoint(root='runs'):
    # ckpt-best.pt is only used when named with --ckpt: "newest" means the latest training state
    paths = glob.glob(os.path.join(root, '*', 'ckpt.pt'))
    if not paths:
        raise UsageError(f'no checkpoint under {root}/ (looked for {root}/*/ckpt.pt); '
                         'train one with `python train.py --dataset moons` or pass --ckpt')
    return max(paths, key=os.path.getmtime)


def parse_times(text, cfg):
    """--times: strictly decreasing, inside [eps, T], the range the network was trained on (Sec. 4.2)."""
    try:
        times = [float(v) for v in text.split(',')]
    except ValueError:
        times = []
    if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:])) \
            or not all(cfg.eps <= t <= cfg.T for t in times):
        raise UsageError(f'--times {text}: give two or more comma-separated times, strictly decreasing, '
                          f'within [eps, T] = [{cfg.eps}, {cfg.T}], e.g. {cfg.T},{cfg.eps}')
    return times


def prepare(net, device, args):
    """Eval mode on the device; channels_last and torch.compile where asked (they change speed, not results)."""
    net = net.eval().to(device)
    if device.type == 'cuda' and net.config['arch'] == 'unet':
        net = net.to(memory_format=torch.channels_last)
    return torch.compile(net) if args.compile else net


def draw_inputs(generator, count, shape, num_classes, sigma_d):
    """Noise x_T ~ N(0, sigma_d^2 I) and a label per sample, drawn sample by sample, so that sample i's
    draws depend on the seed and i only (one batched draw would depend on the batch size)."""
    noise, labels = [], []
    for _ in range(count):
        noise.append(torch.randn(shape, generator=generator) * sigma_d)
        if num_classes:  # drawn even under --class, so that --class changes the labels and not the noise
            labels.append(torch.randint(num_classes, (), generator=generator))
    return torch.stack(noise), torch.stack(labels) if num_classes else None


def generate(net, cfg, times, guidance, data, n, fm, device, autocast, args, vae=None, rank=0, world=1):
    """n samples, batch by batch, decoded: {'arr_0': uint8 NHWC images (latents: through vae) or float32 [n, D]
    vectors, 'arr_1': int64 labels of a class-conditional net} on rank 0 (None on the other ranks). Batch j is
    sampled by rank j % world; every rank draws every batch's inputs, so sample i depends on --seed and i only."""
    num_classes, shape = net.num_classes, list(data['shape'])
    net = prepare(net, device, args)
    noise_generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same noise on every device
    batches = [(start, min(args.batch, n - start)) for start in range(0, n, args.batch)]
    samples, labels_all, mine = [], [], None
    progress = Progress('sample' if rank == 0 and n > args.batch else None, n, 'samples')
    for j, (start, count) in enumerate(batches):
        noise, labels = draw_inputs(noise_generator, count, shape, num_classes, cfg.sigma_d)
        if labels is not None and args.class_label is not None:
            labels.fill_(args.class_label)
        if labels is not None:
            labels_all.append(labels.numpy())
        if j % world == rank:
            mine = sample_batch(net, cfg, times, guidance, data, noise, labels, fm, device, autocast, args, vae, j)
        if j % world == world - 1 or j == len(batches) - 1:   # a round ends: rank r sampled batch j - j % world + r
            done = [x for x in gather(mine, rank, world) if x is not None]
            samples += done
            progress.add(sum(len(x) for x in done))
            mine = None
    if rank != 0:
        return None
    arrays = {'arr_0': np.concatenate(samples)}
    if num_classes:
        arrays['arr_1'] = np.concatenate(labels_all).astype(np.int64)
    return arrays


def gather(mine, rank, world):
    """Rank 0: the arrays of every rank (None where a rank had no batch), in rank order; the other ranks: []."""
    if world == 1:
        return [mine]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered or []


def sample_batch(net, cfg, times, guidance, data, noise, labels, fm, device, autocast, args, vae, j):
    """One batch of samples from its noise and labels, decoded to numpy (uint8 NHWC images, vectors)."""
    restart_generator = None
    if args.restart:  # per batch, so that batch j re-noises alike on 1 or N ranks
        seed = int(np.random.SeedSequence((args.seed, j)).generate_state(1)[0])
        restart_generator = torch.Generator(device).manual_seed(seed)
    noise = noise.to(device)
    if noise.dim() == 4 and device.type == 'cuda':
        noise = noise.contiguous(memory_format=torch.channels_last)
    with autocast:
        x = sample(net, noise, times, cfg, labels=None if labels is None else labels.to(device), guidance=guidance,
                   restart=args.restart, generator=restart_generator, denoiser=fm)
    x = decode(x, data['kind'], data['mean'], data['std'])  # uint8 NHWC images, vectors or raw latents
    return decode_latents(vae, x) if vae is not None else x


def bench(net, cfg, times, guidance, shape, device, autocast, args, name):
    """Seconds per batch of the sampler alone (noise drawn once on the device), printed as one JSON line."""
    num_classes, params = net.num_classes, sum(p.numel() for p in net.parameters())
    net = prepare(net, device, args)
    generator = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(args.batch, *shape, generator=generator, device=device) * cfg.sigma_d
    if noise.dim() == 4 and device.type == 'cuda':
        noise = noise.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(num_classes, (args.batch,), generator=generator, device=device) if num_classes else None

    def run():
        with autocast:
            sample(net, noise, times, cfg, labels=labels, guidance=guidance, restart=args.restart,
                   generator=generator if args.restart else None)
    for _ in range(2):  # warm-up: torch.compile, cuDNN autotuning, allocator
        run()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.bench_batches):
        run()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    per_batch = (time.perf_counter() - start) / args.bench_batches
    print(json.dumps({
        'model': name, 'params': params, 'device': str(device), 'steps': len(times) - 1, 'batch': args.batch,
        'precision': args.precision, 'compile': args.compile, 'guidance': guidance,
        'img_per_s': round(args.batch / per_batch, 2), 's_per_batch': round(per_batch, 5),
        'peak_mem_gib': round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == 'cuda' else None}))


# ---- Set-up, one function per phase of run()

def check_flags(args):
    """A UsageError for flags that are wrong whatever the checkpoint."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f'--steps {args.steps}: the number of jumps must be at least 1 (the paper uses 1 to 8)')
    if args.steps is not None and args.times is not None:
        raise UsageError(f'--steps {args.steps} and --times {args.times}: give one of them, not both')
    for flag, name in [('n', '--num-samples'), ('batch', '--batch'), ('bench_batches', '--bench-batches')]:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"{name} {getattr(args, flag)}: must be at least 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f'--guidance {args.guidance}: must be a finite number (1 = no guidance)')
    if args.model is not None and not args.bench:
        raise UsageError(f'--model {args.model}: only used with --bench; sampling takes the net from --ckpt')
    if args.out is not None and not args.out.endswith('.npz'):
        raise UsageError(f'--out {args.out}: must end in .npz')


def init_processes(args):
    """(rank, world size, device): torchrun's RANK / WORLD_SIZE, each rank on cuda:LOCAL_RANK; a plain run is
    rank 0 of 1 on --device."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f'--device {args.device}: not a device; accepted: cpu, cuda, cuda:N, mps') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device}: CUDA is not available here; use --device cpu')
    if 'RANK' not in os.environ:
        return 0, 1, device
    if args.bench:
        raise UsageError('--bench times one process: run it without torchrun')
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    dist.init_process_group('gloo')   # the ranks exchange decoded samples, CPU arrays, whatever the device
    return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device


def load_net(args):
    """(net, IMMConfig, checkpoint dict or None, its path or the preset's name, sample shape, SAMPLING column):
    --bench --model's fresh preset, or --ckpt's network (a file, a run folder, hf://OWNER/REPO/FILE)."""
    if args.bench and args.model is not None:  # a preset's freshly initialised net: speed does not need weights
        if args.ckpt is not None:
            raise UsageError(f'--model {args.model} and --ckpt {args.ckpt}: give one of them, not both')
        if args.model not in PRESETS:
            raise UsageError(f'--model {args.model}: unknown preset; accepted: {", ".join(PRESETS)}')
        net, c = build_net(PRESETS[args.model]), PRESETS[args.model]
        shape = [c['in_channels'], c['img_resolution'], c['img_resolution']] if c['arch'] in ('unet', 'dit') \
            else [c['dim']]
        return net, IMMConfig(), None, args.model, shape, KIND_OF_ARCH[c['arch']]
    path = checkpoint.file_of(args.ckpt or newest_checkpoint())
    net, cfg, ckpt = checkpoint.load_for_sampling(path, args.raw)
    data = ckpt['data']
    return net, cfg, ckpt, path, list(data['shape']), settings.column(data['kind'], data['shape'], data['name'])


def sampling_settings(args, net, cfg, kind, say):
    """(time grid, guidance w): --times / --steps and --guidance, or SAMPLING's defaults for this kind of checkpoint
    (printed first, as train.py prints its settings)."""
    num_classes = net.num_classes
    if num_classes == 0 and args.class_label is not None:
        raise UsageError(f'--class {args.class_label}: this net is unconditional (num_classes 0); leave it out')
    if num_classes == 0 and args.guidance not in (None, 1.0):
        raise UsageError(f'--guidance {args.guidance}: needs a class-conditional net, this one is unconditional; '
                         'leave it out (1 = no guidance)')
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise UsageError(f'--class {args.class_label}: accepted 0..{num_classes - 1} for this net')
    resolved = settings.sampling_defaults(kind, num_classes > 0)
    given = {'guidance'} if args.guidance is not None else set()
    if args.guidance is not None:
        resolved['guidance'] = args.guidance
    say(settings.describe(argparse.Namespace(**resolved), given, kind, 'SAMPLING'))
    if args.times is not None:
        return parse_times(args.times, cfg), resolved['guidance']
    return sampling_times(args.steps or 2, cfg, resolved['two_step_eta']), resolved['guidance']


def write(out, arrays, kind):
    """The .npz and its picture (a grid of the first images, or a 2-D scatter), each whole or not at all."""
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    write_atomically(out, lambda tmp: np.savez(tmp, **arrays))
    png = os.path.splitext(out)[0] + '.png'
    if kind != 'vector':
        write_atomically(png, lambda tmp: save_image_grid(arrays['arr_0'][:GRID], tmp))
    elif arrays['arr_0'].shape[1] == 2:
        write_atomically(png, lambda tmp: save_scatter(arrays['arr_0'], tmp))
    else:
        png = None  # no picture for vectors of more than two dimensions
    described = ', '.join(f'{k} {v.dtype} {list(v.shape)}' for k, v in arrays.items())
    print(f"wrote {out} ({described}){f' and {png}' if png else ''}")


def run(args):
    check_flags(args)
    rank, world, device = init_processes(args)
    say = print if rank == 0 else (lambda *a, **k: None)   # only rank 0 talks and writes
    args.batch = args.batch or (1024 if device.type == 'cuda' else 256)
    # TF32 matmuls/convolutions only under --precision tf32; bf16 autocasts the network alone, while
    # imm.sample keeps the outer loop (noise, times, c_skip * x) in fp32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == 'tf32'
    autocast = torch.autocast(device.type, torch.bfloat16) if args.precision == 'bf16' else contextlib.nullcontext()
    net, cfg, ckpt, path, shape, kind = load_net(args)
    times, guidance = sampling_settings(args, net, cfg, kind, say if not args.bench else lambda *a, **k: None)
    if args.bench:
        return bench(net, cfg, times, guidance, shape, device, autocast, args, path)

    fm = ckpt['args'].get('loss') == 'fm'  # a flow-matching baseline: sample with its DDIM denoiser
    data, n = ckpt['data'], args.n or (GRID if ckpt['data']['kind'] != 'vector' else 2000)
    if args.vae is not None and data['kind'] != 'latent':
        raise UsageError(f"--vae {args.vae}: only for checkpoints trained on latents; this one holds {data['kind']}s")
    out = args.out or os.path.join(os.path.dirname(path), 'samples.npz')
    say(f"{path} (step {ckpt.get('step', '?')}, {'raw' if args.raw else 'EMA'} weights): "
        f"{data['name']} {data['kind']} {shape}, {net.num_classes} classes" + (
            '; trained with --loss fm, so sampling with the DDIM denoiser (imm.sample(denoiser=True))' if fm else ''))
    say(f"{len(times) - 1} steps, times {','.join(f'{t:.4g}' for t in times)}"
        f"{', restart' if args.restart else ''}; n {n}, batch {args.batch}, seed {args.seed}, "
        + (f"guidance {guidance}, class {'random' if args.class_label is None else args.class_label}, "
           if net.num_classes else '') + f"{world} x {device}, {args.precision}")

    vae = None
    if data['kind'] == 'latent':  # loaded before sampling, so that a missing VAE stops the run at once
        vae_name = args.vae or data.get('vae')
        if not vae_name:
            raise UsageError(f"{path}: its latents name no VAE (their .npz had no 'vae' key); pass --vae, e.g. "
                             f"--vae {DEFAULT_VAE}, the release's")
        say(f'decoding latents with the VAE {vae_name}')
        vae = load_vae(vae_name, device)
    arrays = generate(net, cfg, times, guidance, data, n, fm, device, autocast, args, vae, rank, world)
    if rank == 0:
        write(out, arrays, data['kind'])
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def parser():
    """sample.py's flags (the README's flag table is rendered from this parser)."""
    p = argparse.ArgumentParser(description='Sample from an IMM checkpoint (or benchmark the sampler).')
    add = p.add_argument
    add('--ckpt', help="checkpoint file or run folder, or hf://OWNER/REPO/FILE from the Hugging Face Hub, e.g. the "
                       "authors' hf://lumaai/imm/cifar10.pt (default: the newest runs/*/ckpt.pt)")
    add('--out', help='.npz to write, a grid PNG beside it (default: samples.npz beside the checkpoint)')
    add('--steps', type=int, help='number of jumps f_{s,t}, each one network evaluation (default 2)')
    add('--times', help='explicit time grid instead of --steps, e.g. 0.994,0.5833,0.006: strictly decreasing, '
                        'within [eps, T]; the noise starts at the first, the samples are at the last '
                        '(default: the grid of settings.SAMPLING for --steps)')
    add('--num-samples', '--n', dest='n', type=int,
        help='number of samples (default: 64 images, 2000 vectors; 50000 for FID); under torchrun write '
             '--num-samples, which torchrun cannot mistake for one of its own flags')
    add('--batch', type=int, help='samples per sampler call on each process (default: 1024 on CUDA, 256 on CPU)')
    add('--seed', type=int, default=0, help='seed of the noise and labels; sample i depends on it and i only')
    add('--guidance', type=float, help='classifier-free guidance weight w (Eq. 14); 1 = none '
                                       '(default: settings.SAMPLING, 1.5 for class-conditional latent nets)')
    add('--class', dest='class_label', type=int, help='class of every sample (default: uniform, drawn with --seed)')
    add('--restart', action='store_true', help='restart sampling: jump to eps, re-noise to the next time (App. F)')
    add('--vae', help='latent checkpoints: the diffusers AutoencoderKL that decodes them, a Hugging Face name or '
                      'a local folder (default: the one that encoded the data, as the checkpoint names it)')
    add('--raw', action='store_true', help="use the training weights ckpt['net'] instead of the EMA ckpt['ema']")
    add('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
        help='cpu, cuda or cuda:N (default: cuda when available); torchrun ranks use cuda:LOCAL_RANK')
    add('--precision', default='tf32', choices=['fp32', 'tf32', 'bf16'],
        help='network arithmetic on GPU: fp32, TF32 matmuls (the paper), or bf16 autocast; the sampler loop stays fp32')
    add('--compile', action='store_true', help='torch.compile the network (slow first batch, faster after)')
    add('--bench', action='store_true', help='time the sampler on synthetic noise, print one JSON line, write nothing')
    add('--model', help=f'with --bench and no --ckpt: time a fresh net of this preset ({", ".join(PRESETS)})')
    add('--bench-batches', type=int, default=10, help='timed batches for --bench (after 2 warm-up batches)')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with exit_on_usage_error():
        run(args)


if __name__ == '__main__':
    main()
