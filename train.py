"""
Train a few-step generator with Inductive Moment Matching (IMM, Zhou/Ermon/Song ICML 2025): draw a batch and
per-group times (s, t), take imm.imm_loss, step RAdam (AdamW for latents), update the EMA; checkpoints, pictures
and logs go to --out (default runs/<dataset>).

    python train.py --dataset moons                 # 2-D toy on a CPU, a few minutes -> runs/moons/
    python train.py --dataset digits                # 8x8 handwritten digits on a CPU, ~10 minutes -> runs/digits/
    python train.py --dataset moons --resume        # continue runs/moons/ckpt.pt, or start it if there is none yet
    python train.py --dataset cifar10               # the paper's CIFAR-10 run: 400k steps of batch 4096 (Table 5)
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --precision bf16 --compile
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
    python train.py --dataset cifar10 --fid-every 20000 --fid-ref refs/cifar10.npz   # FID while training
    python train.py --dataset cifar10 --bench 20 --precision bf16   # speed of the chosen config: one JSON line
    torchrun --standalone --nproc_per_node=8 train.py --dataset imagenet-latents.npz   # ImageNet-256 (README)
    sbatch --nodes=4 docs/slurm.sh --dataset data/imagenet-latents.npz   # SLURM, requeued until done (docs/cluster.md)

--dataset is cifar10, digits, mnist, a folder of images, a .npy/.npz array, or a 2-D toy (checkerboard, moons,
spirals, gaussians8); see data.py. Every default is in the table of settings.py, one column per kind of data
(images: the paper's CIFAR-10 run; latents from vae.py: its ImageNet-256 run; small images and 2-D toys: settings
that give good samples in a few CPU minutes); a run prints the settings it resolved before anything else.
--batch is the global batch: it is split across torchrun's ranks, then into micro-batches of whole groups
of M particles (gradient accumulation; M = 1 for flow matching). Everything random in a step is drawn from
generators seeded by (--seed, step), so a resumed run ends with the same weights as an uninterrupted one,
and 1 or N ranks see the same data, times and noise. Then: python sample.py --ckpt runs/moons

On a cluster (docs/cluster.md): SIGTERM or Ctrl-C finishes the step, every rank stops at the same step, and rank 0
writes the checkpoint; rerunning the same command with --resume continues it. A checkpoint that cannot be written
(a full disk) ends the run with one line naming the file, the OS error and the step of the checkpoint still intact.
Progress goes to stdout, log.jsonl and the picture loss.png, and to Weights & Biases with --wandb.

--bench is a configuration of this same run, not a separate script: the same data, network, micro-batching,
compile and DDP are what it times, so the figure is the speed of the run one would start (nothing is written).

Reading order: main() names the phases (processes, data, settings, build, micro-batch, compile/DDP, output,
the loop, report); train() is the loop and draw_batch() its data; checkpoint.py is the run on disk.
"""

import contextlib
import copy
import dataclasses
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

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import settings
from augment import AUGMENT_DIM, apply_augment, draw_augment
from data import DEVICE_SHARE, Dataset, decode, encode, fits_on_device, load_dataset, save_image_grid, save_scatter, \
    save_side_by_side, to_uint8
from imm import draw_times, fm_loss, imm_loss, sample, sampling_times
from model import build_net
from plot import draw_log
from util import UsageError, append_line, exit_on_usage_error, os_error_text, write_atomically

OPTIMIZERS = {'radam': torch.optim.RAdam, 'adamw': torch.optim.AdamW}   # both: betas (0.9, 0.999), eps 1e-8, no decay
# Dense peak TFLOP/s of one GPU per --precision, for MFU (H200: the H100 SXM chip with more memory).
PEAK_TFLOPS = {'H100': dict(bf16=989, fp16=989, tf32=495, fp32=67),
               'H200': dict(bf16=989, fp16=989, tf32=495, fp32=67)}
SAMPLES_SHOWN = {'image': 64, 'vector': 10_000, 'latent': 64}   # images in a grid / points in a scatter picture


@dataclasses.dataclass
class Parts:
    """What a training step runs and changes: the network, the module the step calls (the network, compiled
    and/or wrapped in DDP), its EMA, the optimizer, the fp16 grad scaler and the autocast context."""
    net: torch.nn.Module
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    ddp: DistributedDataParallel | None = None


def main(argv=None):
    args = settings.parse_args(argv)
    given = {key for key, value in vars(args).items() if value is not None}
    rank, world, device = init_processes(args)
    say = print if rank == 0 else (lambda *a, **k: None)   # only rank 0 talks and writes
    data = load_data(args, rank, world)
    init = checkpoint.load_for_sampling(checkpoint.file_of(args.init_from), flag='--init-from')[:2] \
        if args.init_from else None                         # (network, IMMConfig) to start from
    args, cfg, net_config, M, micro = settings.resolve(args, data, world, init and init[0].config)
    say(settings.describe(args, given, settings.kind_of(data, args.dataset)))
    if init and init[1] != cfg:                            # fine-tuning with other method settings is allowed
        differences = checkpoint.config_differences(dataclasses.asdict(init[1]), dataclasses.asdict(cfg), 'imm_config')
        say(f"note: --init-from {args.init_from} was trained with other settings: {'; '.join(differences)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast, scaler = set_precision(args.precision, device)
    net, ema, opt, start_step, best_fid = build(args, cfg, net_config, scaler, device, data.kind, init, say)
    per_rank = args.batch // world
    if micro == 'auto':
        micro = fit_micro_batch(net, data, cfg, args, M, per_rank, autocast, device, world > 1)
    model = compile_net(net, data, cfg, args, M, micro, autocast, device) if args.compile else net
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                  broadcast_buffers=False) if world > 1 else None
    parts = Parts(net, ddp or model, ema, opt, scaler, autocast, ddp)
    out = Output(args, data, cfg, start_step, device, best_fid) if rank == 0 and args.out else None
    say(f"{data.name}: {data.kind} {list(data.x.shape[1:])} x {len(data.x)}"
        f"{f', {net.num_classes} classes' if net.num_classes else ''} | {net_config['arch']} {args.model} "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params | {args.loss} M={M} | batch {args.batch} = "
        f"{world} rank(s) x {per_rank // micro} x {micro} | {device} {args.precision}"
        f"{' compiled' if model is not net else ''} | steps {start_step}->{args.iters} | {args.out or 'bench'}")

    data = place_data(data, args, device, say)
    loop = functools.partial(train, args=args, cfg=cfg, data=data, parts=parts, M=M, micro=micro, out=out,
                             rank=rank, world=world, say=say)
    first = start_step
    if args.bench:                                         # untimed warm-up steps, then the timer
        loop(first, first + settings.BENCH_WARMUP)
        first += settings.BENCH_WARMUP
        synchronize(device, reset_peak_memory=True)
    started = time.time()
    status, stopped = loop(first, args.iters)

    if args.bench:
        synchronize(device)
        report_bench(args, net, data, device, world, micro, model is not net, (time.time() - started) / args.bench, say)
    elif status == 0 and not stopped:
        say(f"done: {os.path.join(args.out, 'ckpt.pt')} at step {args.iters}. "
            f"Sample with: python sample.py --ckpt {args.out}")
    if out is not None:
        out.close()
    if world > 1:  # tear down together, DDP first: gloo work it still holds at interpreter exit aborts the rank
        parts = loop = ddp = None
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
    if distributed:  # gloo for CPU tensors too: the loop's yes/no agreements (any_rank) cost no GPU synchronisation
        dist.init_process_group('cpu:gloo,cuda:nccl' if device.type == 'cuda' else 'gloo')
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


def place_data(data, args, device, say):
    """The data where the steps read it: images, vectors and labels on the device; latents on the device whole when
    they fit in data.DEVICE_SHARE of its memory, else left mapped from their file, each step's rows gathered on the
    host (data.Latents). The run says which."""
    labels = None if data.labels is None else data.labels.to(device)
    if data.kind != 'latent':
        return dataclasses.replace(data, x=data.x.to(device), labels=labels)
    if data.x.posterior_std is None:
        say(f"note: {data.name} holds no posterior_std (a file written before vae.py stored it, or a plain array): "
            f"every use of a latent is its posterior mean, as with --no-latent-draw")
    nbytes = data.x.nbytes(args.latent_draw)
    whole = fits_on_device(nbytes, device)
    what = 'posterior means and stds' if args.latent_draw else 'posterior means'
    say(f"latents: {what}, {nbytes / 2 ** 30:.2f} GiB, " + (
        f"copied whole to {device} (at most {DEVICE_SHARE:.0%} of its memory)" if whole else
        f"memory-mapped from {data.name}; each step's rows are gathered on the host"
        + (f" and copied to {device} from pinned memory" if device.type == 'cuda' else '')))
    return dataclasses.replace(data, x=data.x.placed(device, whole, args.latent_draw), labels=labels)


def set_precision(precision, device):
    """(autocast context, grad scaler) for --precision; TF32 matmuls and convolutions only under tf32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'tf32'
    torch.backends.cudnn.benchmark = True
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else contextlib.nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == 'fp16')


def build(args, cfg, net_config, scaler, device, kind, init=None, say=print):
    """(net, EMA, optimizer, first step, best FID so far): fresh from --seed (or --init-from's weights, init), or the
    state of --resume's checkpoint. A checkpoint of another config, or a run already in --out without --resume,
    is refused before any write. --resume alone starts a new run when <out>/ckpt.pt does not exist yet (a requeued
    job reruns its first command); --resume PATH names a file, so a missing one is an error, not a new run."""
    ckpt_path = args.out and os.path.join(args.out, 'ckpt.pt')
    torch.manual_seed(args.seed)                           # the initial weights (replaced when resuming)
    np.random.seed(args.seed)                              # unused by training, but stored in checkpoints: seeded,
    random.seed(args.seed)                                 # a run's checkpoint is a function of its flags alone
    net = build_net(net_config)
    if init is not None:
        checkpoint.load_weights(net, init[0].state_dict(), f'--init-from {args.init_from}')
    net.grad_checkpoint = args.grad_checkpoint             # a switch of the module, not of net_config: may change
    ckpt = None
    if args.resume is not None:
        path = args.resume or ckpt_path                    # any_rank: every rank decides alike, even where a
        if args.resume or any_rank(os.path.isfile(path)):  # network file system shows a node an older folder
            ckpt = checkpoint.read(path)
            checkpoint.check_resumable(ckpt, path, net.config, cfg, args.loss, args.optimizer)
        else:
            say(f"--resume: no checkpoint at {path} yet; starting a new run")
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


def trial_step(model, data, cfg, args, M, rows, autocast, device):
    """One forward/backward on `rows` synthetic rows, gradients dropped: checks that a micro-batch fits and compiles."""
    t, s = draw_times(rows // M, cfg, device=device)
    x = torch.zeros(rows, *data.x.shape[1:], device=device)
    labels = torch.zeros(rows, dtype=torch.long, device=device) if args.cond else None
    augment_labels = torch.zeros(rows, AUGMENT_DIM, device=device) if args.augment else None
    with autocast:
        loss = micro_loss(model, x, cfg.sigma_d * torch.randn_like(x), t, s, labels, augment_labels, cfg, args.loss)
    loss.backward()
    model.zero_grad(set_to_none=True)


def fit_micro_batch(net, data, cfg, args, M, per_rank, autocast, device, distributed):
    """--micro-batch auto: the per-rank batch, halved (to a multiple of M that divides it) until a step fits
    in GPU memory; on a CPU the whole per-rank batch. All ranks take the smallest that fits on any."""
    micro = per_rank
    while device.type == 'cuda':
        try:
            trial_step(net, data, cfg, args, M, micro, autocast, device)
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


def compile_net(net, data, cfg, args, M, micro, autocast, device):
    """torch.compile(net), tried on one micro-batch; the eager net, with a warning, if compiling fails."""
    try:
        model = torch.compile(net)
        trial_step(model, data, cfg, args, M, micro, autocast, device)
        return model
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"warning: torch.compile failed ({type(e).__name__}: {reason}); training without it", file=sys.stderr)
        net.zero_grad(set_to_none=True)
        return net


class Output:
    """The run's folder (rank 0): log.jsonl and its picture loss.png, pictures of 1- and 2-step EMA samples from
    fixed noise, FID evaluations, checkpoints, and --wandb. Made after a resume has been checked, so a refused run
    writes nothing.

    A checkpoint that cannot be written (no space, no permission, an I/O error) ends the run: save() prints the one
    line that says so and returns False. The log, loss.png and the sample pictures are not needed to resume: one
    that cannot be written gives a warning and the run goes on (its next checkpoint may still fit)."""

    def __init__(self, args, data, cfg, start_step, device, best_fid):
        self.args, self.cfg, self.info, self.best_fid = args, cfg, data, best_fid
        self.path = lambda name: os.path.join(args.out, name)
        self.saved_step = start_step if os.path.exists(self.path('ckpt.pt')) else None   # the intact checkpoint
        try:
            os.makedirs(self.path('samples'), exist_ok=True)
            for name in os.listdir(args.out):              # what a run killed while saving (SIGKILL) left
                if re.fullmatch(r'ckpt(-best)?\.tmp\d+\.pt', name):
                    os.remove(self.path(name))
            self.history = checkpoint.trim_log(self.path('log.jsonl'), start_step)   # the steps up to the start
            self.wandb = start_wandb(args, cfg, self.path('wandb-id'), start_step) if args.wandb else None
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write there ({os_error_text(e)})") from None
        shown, num_classes = SAMPLES_SHOWN[data.kind], data.num_classes if args.cond else 0
        fixed = torch.Generator().manual_seed(args.seed)   # the same noise (and labels) in every picture
        self.noise = (cfg.sigma_d * torch.randn(shown, *data.x.shape[1:], generator=fixed)).to(device)
        self.labels = (torch.arange(shown) % num_classes).to(device) if num_classes else None
        self.sampling = settings.sampling_defaults(settings.kind_of(data, args.dataset), num_classes > 0)
        self.extent = None
        if data.kind == 'vector':                          # the data itself, on the axes the samples will use
            real = decode(data.x[torch.randperm(len(data.x), generator=fixed)[:shown]], 'vector', data.mean, data.std)
            lo, hi = float(real[:, :2].min()), float(real[:, :2].max())
            self.extent = (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
            self.write_picture('data.png', lambda tmp: save_scatter(real, tmp, self.extent))
        self.fid = None
        if args.fid_every:
            from fid import InceptionFeatures, load_ref
            self.fid = (InceptionFeatures(args.fid_weights).to(device), load_ref(args.fid_ref))

    def times(self, steps):
        """The time grid of `steps` jumps that sample.py would use for this run (settings.SAMPLING)."""
        return sampling_times(steps, self.cfg, self.sampling['two_step_eta'])

    def log(self, entry):
        """One entry in log.jsonl (a whole line or none), loss.png redrawn, and the entry to wandb."""
        self.history.append(entry)
        self.attempt('log.jsonl', lambda: append_line(self.path('log.jsonl'), json.dumps(entry) + '\n'))
        self.write_picture('loss.png', lambda tmp: draw_log(self.history, tmp))
        if self.wandb:
            self.wandb.log({k: v for k, v in entry.items() if k not in ('step', 'time')}, step=entry['step'])

    def write_picture(self, name, draw):
        """draw(file) into the run's folder, whole or not at all."""
        self.attempt(name, lambda: write_atomically(self.path(name), draw))

    def attempt(self, name, write):
        """write(); a failure warns (the file is not needed to resume) and the run goes on."""
        try:
            write()
        except OSError as e:
            print(f"warning: cannot write {self.path(name)} ({os_error_text(e)}); training goes on", file=sys.stderr)

    def pictures(self, ema, done):
        """1- and 2-step samples of the EMA from the fixed noise (an image grid, or a 2-D density picture), and both
        side by side, labelled: on small images a short run's 1-step samples can lag far behind its 2-step ones."""
        data, paths = self.info, []
        for steps in (1, 2):
            x0 = sample(ema, self.noise, self.times(steps), self.cfg, self.labels, self.sampling['guidance'],
                        denoiser=self.args.loss == 'fm')
            name = os.path.join('samples', f'{done:07d}-{steps}step.png')
            if data.kind == 'latent':  # no VAE while training: latent channels 0-2 (or 0), +-2 std, as RGB (grey)
                grid = decode(x0[:, :3] if x0.shape[1] >= 3 else x0[:, :1], 'image')
                self.write_picture(name, lambda tmp: save_image_grid(grid, tmp))
            elif data.kind == 'image':
                self.write_picture(name, lambda tmp: save_image_grid(decode(x0, 'image'), tmp))
            else:
                self.write_picture(name, lambda tmp: save_scatter(decode(x0, 'vector', data.mean, data.std), tmp,
                                                                  self.extent))
            if self.wandb and os.path.exists(self.path(name)):
                self.wandb.log({f'samples_{steps}step': self.wandb.Image(self.path(name))}, step=done)
            paths.append(self.path(name))
        if all(map(os.path.exists, paths)):
            self.write_picture(os.path.join('samples', f'{done:07d}-1and2step.png'),
                               lambda tmp: save_side_by_side(paths, ['1 step', '2 steps'], tmp))

    def evaluate_fid(self, ema, autocast, done, say):
        """FID of --fid-n EMA samples at 1 and 2 steps, the same noise (and labels) each time; the best 2-step
        network is kept as ckpt-best.pt (by the caller, which saves when this returns True)."""
        from fid import fid_of_sampler
        args, cfg, (inception, ref) = self.args, self.cfg, self.fid
        fids = {}
        for steps in (1, 2):
            noise_gen = torch.Generator(self.noise.device).manual_seed(seed_for(args.seed, 3))

            def generate(b):
                z = cfg.sigma_d * torch.randn(b, *self.noise.shape[1:], generator=noise_gen, device=self.noise.device)
                labels = torch.randint(ema.num_classes, (b,), generator=noise_gen, device=z.device) \
                    if ema.num_classes else None
                with autocast:
                    x0 = sample(ema, z, self.times(steps), cfg, labels, self.sampling['guidance'],
                                denoiser=args.loss == 'fm')
                return to_uint8(x0)
            fids[steps] = fid_of_sampler(generate, args.fid_n, ref, net=inception)
        say(f"step {done} | FID-{args.fid_n // 1000}k 1-step {fids[1]:.3f} | 2-step {fids[2]:.3f}", flush=True)
        self.log({'step': done, 'fid_1step': fids[1], 'fid_2step': fids[2]})
        if self.best_fid is not None and fids[2] >= self.best_fid:
            return False
        self.best_fid = fids[2]
        return True

    def save(self, parts, step, name='ckpt.pt'):
        """The checkpoint of `step` as `name`; True when written. If it cannot be, the one 'error:' line that says
        which file, why, and which checkpoint is intact (nothing half-written is left), and False."""
        try:
            checkpoint.save(self.path(name), checkpoint.make(
                parts.net, parts.ema, parts.opt, parts.scaler, step, self.args, self.cfg, self.info, self.best_fid))
        except OSError as e:
            intact = 'no checkpoint of this run was written yet' if self.saved_step is None else \
                f"{self.path('ckpt.pt')} (step {self.saved_step}) is intact"
            best = f'{self.path(name)} is as it was; ' if name != 'ckpt.pt' else ''
            print(f"error: cannot write {self.path(name)} at step {step}: {os_error_text(e)}. {best}{intact}, and "
                  f"nothing half-written is left. Free space (or fix the folder), then run the same command with "
                  f"--resume.", file=sys.stderr)
            return False
        if name == 'ckpt.pt':
            self.saved_step = step
        return True

    def close(self):
        if self.wandb:
            self.wandb.finish()


# ---- The loop

def draw_batch(step, data, args, cfg, M, rank=0, world=1):
    """Everything random in global batch `step`, as this rank's share: (x, noise, t, s, labels, augment_labels).

    Rows, times, flips, noise and dropped labels come from one generator seeded by (--seed, step) and are drawn
    for the whole batch, of which each rank keeps its slice: 1 or N ranks, and a resumed run, see the same batch.
    t and s are one per group of M rows (M = 1 for flow matching). With --augment p > 0, EDM's augmentation
    (augment.py) replaces the plain x-flip, and its labels go to the network; otherwise augment_labels is None.
    Latents with --latent-draw are drawn last, mean + std * n per row, so that every draw before them is the same
    without it. The global RNG, which draws dropout masks, is seeded by (--seed, step, rank)."""
    per_rank, device = args.batch // world, data.x.device
    mine = slice(rank * per_rank, (rank + 1) * per_rank)                 # this rank's rows ...
    my_groups = slice(rank * per_rank // M, (rank + 1) * per_rank // M)  # ... and its groups of M rows
    gen = torch.Generator(device).manual_seed(seed_for(args.seed, 1, step))
    torch.manual_seed(seed_for(args.seed, 2, step, rank))
    rows = batch_rows(step, args.batch, len(data.x), args.seed, device)[mine]
    t, s = (v[my_groups] for v in draw_times(args.batch // M, cfg, generator=gen, device=device))
    x, augment_labels = None if data.kind == 'latent' else data.x[rows], None   # latents: at the end
    if data.kind == 'image':
        x = encode(x)
        if args.augment:
            x, augment_labels = apply_augment(x, draw_augment(args.batch, args.augment, gen)[mine])
        elif args.xflip:
            flip = torch.rand(args.batch, generator=gen, device=device)[mine] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if device.type == 'cuda':
            x = x.contiguous(memory_format=torch.channels_last)
    noise = cfg.sigma_d * torch.randn(args.batch, *data.x.shape[1:], generator=gen, device=device)[mine]
    labels = None
    if args.cond:
        drop = torch.rand(args.batch, generator=gen, device=device)[mine] < args.label_dropout
        labels = torch.where(drop, data.num_classes, data.labels[rows])
    if data.kind == 'latent':  # the release (after EDM2): a fresh latent per use; no flips (App. I)
        draw = torch.randn(args.batch, *data.x.shape[1:], generator=gen, device=device)[mine] \
            if args.latent_draw else None
        x = data.x.batch(batch_rows(step, args.batch, len(data.x), args.seed, device, data.x.on_host)[mine], draw)
    return x, noise, t, s, labels, augment_labels


def train(first, last, args, cfg, data, parts, M, micro, out, rank, world, say):
    """Optimizer steps first .. last - 1, then (status, stopped): status 1 when the loss became non-finite or a
    checkpoint could not be written (the last checkpoint stays intact), else 0; stopped when Ctrl-C or SIGTERM ended
    the run early, checkpointed. Every rank takes each of these turns at the same step (any_rank)."""
    stop = []
    def request_stop(signum, frame):                       # finish the step, checkpoint, stop
        stop.append(signum)
        if signum == signal.SIGINT:                        # a second Ctrl-C stops at once; SIGTERM may come twice
            signal.signal(signum, signal.SIG_DFL)          # (SLURM signals every process, torchrun forwards it)
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    loss_sum = torch.zeros((), device=data.x.device)       # summed on the device; read only when logging
    bad_step = torch.full((), -1, device=data.x.device)    # first step with a non-finite loss, -1 if none
    last_good, timer = None, (time.time(), first)
    due = lambda every, done: every and (done % every == 0 or done == args.iters)
    try:
        for step in range(first, last):
            signum = any_rank(stop[0] if stop else 0)      # a signal to any rank stops them all here
            if signum:
                say(f"stopped by signal {signum} at step {step}")
                if world > 1:
                    dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                if int(bad_step) < 0 and out is not None:
                    if not out.save(parts, step):
                        return 1, True
                    say(f"wrote {os.path.join(args.out, 'ckpt.pt')} (step {step}); "
                        f"continue with the same command and --resume")
                return 0, True
            batch = draw_batch(step, data, args, cfg, M, rank, world)
            step_loss = train_step(parts, batch, cfg, args, M, micro)
            loss_sum += step_loss
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(step_loss), step + 1, bad_step)
            done = step + 1
            if not any(due(every, done) for every in (args.log_every, args.ckpt_every, args.sample_every,
                                                      args.fid_every)):
                continue                                   # the device is read only on the steps below
            if world > 1:                                  # every rank stops together
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
            if int(bad_step) >= 0:
                kept = f"the last good checkpoint, {os.path.join(args.out, 'ckpt.pt')} (step {last_good or first}), " \
                       f"is intact" if last_good or first else "no checkpoint was written"
                if rank == 0:
                    print(f"error: the loss became non-finite at step {int(bad_step)}; stopping. {kept}. "
                          f"Try a lower --lr, --grad-clip 1, or --precision fp32.", file=sys.stderr)
                return 1, False
            if due(args.log_every, done):
                timer = log(loss_sum, timer, done, args, world, out, say)
            if due(args.sample_every, done) and out is not None:
                out.pictures(parts.ema, done)
            saved = True                                   # rank 0 evaluates and saves, the others wait
            if due(args.fid_every, done) and out is not None and out.evaluate_fid(parts.ema, parts.autocast, done, say):
                saved = out.save(parts, done, 'ckpt-best.pt')
            if due(args.ckpt_every, done) and out is not None and saved:
                saved = out.save(parts, done)
                last_good = done
            if (due(args.fid_every, done) or due(args.ckpt_every, done)) and any_rank(not saved):
                return 1, False                            # rank 0 said why
        return 0, False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_step(parts, batch, cfg, args, M, micro):
    """One optimizer step on this rank's share of the batch: forward/backward per micro-batch of whole groups
    (all but the last skip DDP's all-reduce), optional clipping, the optimizer, the EMA. Returns the loss."""
    x, noise, t, s, labels, augment_labels = batch
    num_micro = len(x) // micro
    step_loss = torch.zeros((), device=x.device)
    for i in range(num_micro):
        r = slice(i * micro, (i + 1) * micro)                                   # rows ...
        g = slice(i * micro // M, (i + 1) * micro // M)                         # ... and their groups
        last_micro = parts.ddp is None or i == num_micro - 1
        with contextlib.nullcontext() if last_micro else parts.ddp.no_sync():
            with parts.autocast:
                loss = micro_loss(parts.model, x[r], noise[r], t[g], s[g], None if labels is None else labels[r],
                                  None if augment_labels is None else augment_labels[r], cfg, args.loss) / num_micro
            parts.scaler.scale(loss).backward()
        step_loss += loss.detach()
    if args.grad_clip:
        parts.scaler.unscale_(parts.opt)
        torch.nn.utils.clip_grad_norm_(parts.net.parameters(), args.grad_clip)
    parts.scaler.step(parts.opt)
    parts.scaler.update()
    parts.opt.zero_grad(set_to_none=True)
    with torch.no_grad():                                  # EMA: ema += (1 - decay) (net - ema), one fused op
        torch._foreach_lerp_(list(parts.ema.parameters()), list(parts.net.parameters()), 1 - args.ema)
    return step_loss


def micro_loss(model, x, noise, t, s, labels, augment_labels, cfg, loss):
    """The training loss of one micro-batch: IMM (Eq. 12; t, s one per group of M rows) or flow matching."""
    if loss == 'imm':
        return imm_loss(model, x, noise, t, s, cfg, labels, augment_labels)
    return fm_loss(model, x, noise, t, cfg, labels, augment_labels)


def log(loss_sum, timer, done, args, world, out, say):
    """The mean loss since the last log line, speed and ETA: one progress line, one log.jsonl entry. Returns the
    new timer (time, step) and zeroes loss_sum."""
    t_last, step_last = timer
    if world > 1:
        dist.all_reduce(loss_sum)
    mean_loss = loss_sum.item() / (done - step_last) / world
    loss_sum.zero_()
    sec = (time.time() - t_last) / (done - step_last)
    eta = sec * (args.iters - done)
    say(f"step {done}/{args.iters} | loss {mean_loss:.4g} | {args.batch / sec:.0f} img/s | {sec:.3f} s/step | "
        f"ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s", flush=True)
    if out is not None:
        out.log({'step': done, 'loss': mean_loss, 'img_per_s': args.batch / sec, 'sec_per_step': sec, 'eta_s': eta,
                 'time': time.time()})
    return time.time(), done


# ---- Helpers of the loop and of --bench

def any_rank(flag):
    """The largest over all ranks of an integer flag (a yes/no, a signal number), so that every rank takes the same
    turn; the flag itself in a single process. A CPU tensor: gloo carries it, without a GPU synchronisation."""
    if not dist.is_initialized():
        return int(flag)
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def start_wandb(args, cfg, id_file, start_step):
    """--wandb PROJECT: wandb.init (imported only here) with the run's settings. A resumed run continues its wandb
    run, whose id the run's folder keeps in id_file; a new run starts a new one. Returns the wandb module."""
    import wandb
    resumed_id = open(id_file).read().strip() if start_step and os.path.exists(id_file) else None
    try:
        wandb.init(project=args.wandb, name=os.path.basename(os.path.normpath(args.out)), id=resumed_id,
                   resume='allow', dir=args.out, config={**vars(args), 'imm_config': dataclasses.asdict(cfg)})
    except wandb.errors.Error as e:
        raise UsageError(f"--wandb {args.wandb}: {e} (where nodes have no network: WANDB_MODE=offline, "
                         f"then wandb sync)") from None
    def write_id(tmp):
        with open(tmp, 'w') as f:
            f.write(wandb.run.id)
    write_atomically(id_file, write_id)
    return wandb


def seed_for(*keys):
    """A 32-bit seed that mixes integer keys (seed, stream, step, ...) so that nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch, device, host=False):
    """The order in which epoch `epoch` visits the n examples: a permutation seeded by (seed, epoch), drawn on device;
    host: a CPU copy of it, for data gathered on the host (one copy per epoch, not one wait for the device per step)."""
    if host:
        return epoch_order(n, seed, epoch, device).cpu()
    return torch.randperm(n, generator=torch.Generator(device).manual_seed(seed_for(seed, 0, epoch)), device=device)


def batch_rows(step, batch, n, seed, device, host=False):
    """Dataset rows of global batch `step`: positions step*batch ... of an endless stream of shuffled epochs."""
    rows, pos, end = [], step * batch, (step + 1) * batch
    while pos < end:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, end - pos)
        rows.append(epoch_order(n, seed, epoch, device, host)[offset:offset + take])
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


def report_bench(args, net, data, device, world, micro, compiled, step_s, say):
    """--bench: one JSON line of speed (img/s, s/step), peak memory, counted TFLOP/s and MFU per device."""
    fwd_flops = forward_flops(net, list(data.x.shape[1:]), net.num_classes, device)
    passes = 4 if args.loss == 'imm' else 3                # forward passes' worth: IMM 2 forward + backward
    tflops = fwd_flops * passes * args.batch / step_s / 1e12 / world                           # per device
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    peak = args.peak_tflops or next((v[args.precision] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in net.parameters())
    say(json.dumps({'img_per_s': round(args.batch / step_s, 2), 'step_s': round(step_s, 5),
                    'peak_mem_gb': round(peak_mem / 2 ** 30, 3), 'tflops': round(tflops, 3),
                    'mfu': round(tflops / peak, 4) if peak else None, 'peak_tflops': peak,
                    'fwd_gflops_per_sample': float(f"{fwd_flops / 1e9:.4g}"),
                    'device': gpu or str(device), 'world_size': world, 'precision': args.precision,
                    'compiled': compiled, 'model': args.model, 'params_m': round(params / 1e6, 3),
                    'loss': args.loss, 'batch': args.batch, 'micro_batch': micro, 'steps': args.bench}), flush=True)


if __name__ == '__main__':
    with exit_on_usage_error():
        sys.exit(main())
