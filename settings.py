"""
Every setting of a training run in one place: train.py's flags, the table of defaults per kind of data, and
resolve(), which turns the flags and the data into what the run is.

    import settings
    args = settings.parse_args(['--dataset', 'moons'])
    args, cfg, net_config, M, micro = settings.resolve(args, data, world=1)   # data from data.load_dataset
    print(settings.describe(args, given, settings.kind_of(data, args.dataset)))

The kind of the data picks a column of TABLE: 'image' (pixels: the paper's CIFAR-10 run, Table 5), 'small image'
(a side of 16 or less, cifar10 excepted: the 8x8 digits, a user's small set), 'vector' (2-D toys) and 'latent' (SD-VAE
latents from vae.py: the paper's ImageNet-256 run, App. I). A flag given on the command line wins over the table;
a flag left out takes its kind's value. Beside each value: the paper's reference, or why we chose another. The
CPU columns were chosen by the sweeps of docs/experiments.md, on more than one data set each. SAMPLING holds
sample.py's defaults (the time grid and the guidance weight) in the same columns, picked by the kind of checkpoint:

    settings.sampling_defaults('latent', conditional=True)    # {'two_step_eta': None, 'guidance': 1.5}
"""
import argparse
import functools
import math
import os
import re
from dataclasses import dataclass

import torch

from augment import AUGMENT_DIM, AUGMENT_P
from data import SIGMA_D
from imm import IMMConfig
from model import PRESETS, build_net
from util import UsageError


@dataclass(frozen=True)
class Follows:
    """A default that follows something else: cases[value of `on`], or `otherwise`. `on` is a setting ('param',
    'schedule') or a fact of the run: 'labels' (the data has class labels), 'cifar10' (the data set is cifar10 and
    the network can take augmentation labels), 'posterior_std' (latents whose file holds the posterior's std)."""
    on: str
    cases: dict
    otherwise: object

    def __str__(self):
        cases = [f'{v} with {self.on}' if k is True else f'{v} if {self.on}={k}' for k, v in self.cases.items()]
        return ', '.join(cases) + f', else {self.otherwise}'


KINDS = ('image', 'small image', 'vector', 'latent')
SMALL_IMAGE = 16                      # images with a side up to this (cifar10 excepted) are 'small image'
BENCH_WARMUP = 3                      # untimed steps before --bench timing (compile, autotuning)
OPTIMIZER_NAMES = ('adamw', 'radam')  # train.OPTIMIZERS: betas (0.9, 0.999), eps 1e-8, no weight decay
EPS = Follows('param', {'euler_fm': 0.0}, 0.006)
T = Follows('schedule', {'cosine': 0.996}, 0.994)

TABLE = [
    # setting      image        small image   vector       latent       where the value comes from
    # -- data
    ('xflip',      True,        False,        False,       False,       "Table 5: x-flip on CIFAR-10; handwriting is not mirror-symmetric; App. I: no flips of latents (vectors: not used)"),
    ('augment',    Follows('cifar10', {True: AUGMENT_P}, 0.0), 0.0, 0.0, 0.0,
     "Table 5 lists EDM augmentation for CIFAR-10 and states no p: EDM's own CIFAR-10 p = 0.12; App. I: none"),
    ('cond',       False,       False,        False,       Follows('labels', {True: True}, False),
     "Table 5: unconditional CIFAR-10; App. I: class-conditional ImageNet (latents with labels)"),
    ('label_dropout', 0.1,      0.1,          0.1,         0.1,         "App. I: labels dropped to the null class with p = 0.1, for guidance (Eq. 14)"),
    ('latent_draw', False,      False,        False,       Follows('posterior_std', {True: True}, False),
     "the release (after EDM2): a fresh latent mean + std * n at each use; the mean where the file has no std (images, vectors: not used)"),
    # -- network
    ('model',      'ddpmpp',    'small',      'mlp',       'dit-xl2',   "Table 5: DDPM++; App. I: DiT-XL/2; a small U-Net and an MLP sized for a CPU (docs/experiments.md)"),
    ('channels',   None,        Follows('model', {'small': 16}, None), 64, None,
     "the preset's width; the small U-Net at 16 on small images (the sweep over six sets, docs/experiments.md section 5); a 64-wide MLP for 2-D toys"),
    # -- method (imm.IMMConfig, docs/method.md)
    ('particles',  4,           4,            4,           4,           "Table 5, App. I: M = 4"),
    ('schedule',   'fm',        'fm',         'fm',        'fm',        "Table 5, App. I: the flow-matching schedule"),
    ('param',      'simple_edm', 'simple_edm', 'euler_fm', 'euler_fm',  "Table 5: simple-EDM; App. I: Euler-FM; toys: Euler-FM drew rings and spirals that simple-EDM did not (docs/experiments.md)"),
    ('k',          15,          10,           10,          12,          "Table 5: 15; App. I: 12; CPU budgets: 10 trained far faster than 15 (docs/experiments.md)"),
    ('a',          1.0,         1.0,          1.0,         2.0,         "Eq. 13: Table 5 a = 1; App. I.6: a = 2 for the best ImageNet model"),
    ('b',          5.0,         5.0,          5.0,         4.0,         "Eq. 13: Table 5 b = 5; App. I: b = 4"),
    ('eps',        EPS,         EPS,          EPS,         EPS,         "the paper's pairing: 0.006 with simple-EDM (Table 5, App. C.7), 0 with Euler-FM (App. I)"),
    ('T',          T,           T,            T,           T,           "Sec. 4.2: 0.994 for fm, 0.996 for cosine (eta(T) about 160 for both)"),
    ('second_time', 's',        's',          's',         't-s',       "Table 5: s; App. I.6: t - s for the best ImageNet model"),
    ('min_gap',    0.0,         0.0,          0.0,         1e-4,        "App. I.6: r <= t - 1e-4 with fp16; off in fp32 and tf32"),
    ('target_fp32', True,       True,         True,        True,        "ours: the stop-gradient target in fp32 under bf16/fp16 keeps it sharp (App. I.6 trains in fp16)"),
    # -- optimisation
    ('iters',      400_000,     7500,         6000,        1_200_000,   "Table 5: 400k; App. I: 1.2M; CPU budgets of about 5 minutes (8x8 images; docs/experiments.md)"),
    ('batch',      4096,        32,           512,         4096,        "Table 5, App. I: 4096; CPU budgets: more, smaller steps won at 5 minutes (docs/experiments.md)"),
    ('optimizer',  'radam',     'radam',      'radam',     'adamw',     "Table 5: RAdam; App. I: AdamW; both betas (0.9, 0.999), eps 1e-8, no weight decay"),
    ('lr',         1e-4,        1e-3,         2e-3,        1e-4,        "Table 5, App. I: 1e-4; larger for the small CPU nets (docs/experiments.md)"),
    ('ema',        0.9999,      0.995,        0.99,        0.9999,      "Table 5, App. I: 0.9999; shorter for runs of a few thousand steps"),
    ('grad_clip',  0.0,         0.0,          0.0,         0.0,         "Table 5, App. I: no clipping"),
    ('precision',  'tf32',      'tf32',       'tf32',      'fp16',      "Table 5: TF32; App. I.6: fp16 for the best ImageNet model"),
    ('threads',    0,           1,            1,           0,           "torch's default; one CPU thread for small nets, where more only add overhead"),
    ('grad_checkpoint', False,  False,        False,       False,       "ours: off, the paper's runs fit; on, the U-Net or DiT blocks recompute their activations in the backward pass: less memory, more time (docs/performance.md)"),
    # -- output
    ('log_every',  100,         100,          100,         100,         "ours"),
    ('ckpt_every', 5000,        500,          1000,        5000,        "ours: a few minutes of work lost at most"),
    ('sample_every', 10_000,    500,          1000,        10_000,      "ours: pictures of 1- and 2-step samples"),
]


# sample.py's defaults (also those of train.py's pictures and FID), one column per kind of checkpoint as in TABLE.
# A flag given to sample.py wins: --times (or --steps with another grid), --guidance.
SAMPLING = [
    # setting       image   small image   vector   latent
    ('two_step_eta', 1.4,   1.4,          1.4,     None,
     "the release's configs: CIFAR-10 samples 2 steps with eta(t1) = 1.4 (Sec. 4.3), ImageNet uniform grids in t at "
     "1, 2, 4, 8 steps (None = uniform); small images and vectors follow CIFAR-10; 1 step is T -> eps and 3 or more "
     "uniform in t in every column"),
    ('guidance',     1.0,   1.0,          1.0,     Follows('labels', {True: 1.5}, 1.0),
     "Eq. 14: w = 1.5 in every ImageNet config of the release and for the paper's ImageNet FIDs (class-conditional "
     "nets); CIFAR-10 is unconditional, and w = 1 is no guidance"),
]


def kind_of(data, dataset):
    """The column of TABLE for a data.Dataset: its kind, or 'small image' for small images other than cifar10."""
    return column(data.kind, list(data.x.shape[1:]), dataset)


def column(kind, shape, dataset):
    """The column of TABLE and SAMPLING for data of `kind` ('image', 'vector', 'latent') and sample `shape` named
    `dataset`: 'small image' for images with a side of SMALL_IMAGE or less other than cifar10, else the kind."""
    small = kind == 'image' and max(shape[1:]) <= SMALL_IMAGE and dataset != 'cifar10'
    return 'small image' if small else kind


def defaults(kind, table=TABLE):
    """{setting: its value in `table` for `kind`} (a Follows where the value follows another setting or a fact)."""
    column = KINDS.index(kind)
    return {row[0]: row[1 + column] for row in table}


def sampling_defaults(kind, conditional):
    """{'two_step_eta': .., 'guidance': ..}: SAMPLING's column `kind`, for a class-conditional net or not."""
    facts = {'labels': conditional}
    return {key: value.cases.get(facts[value.on], value.otherwise) if isinstance(value, Follows) else value
            for key, value in defaults(kind, SAMPLING).items()}


def parse_args(argv=None):
    return parser().parse_args(argv)


def parser():
    """train.py's flags (the README's flag table is rendered from this parser)."""
    p = argparse.ArgumentParser(description='Train an IMM generator (see the module docstring of train.py). '
                                            '"settings table" is TABLE in settings.py, printed at the start of a run.')
    add = p.add_argument
    table = ' (default: settings table)'
    # data
    add('--dataset', default='cifar10',
        help='cifar10, digits, mnist, a folder of images, a .npy/.npz file (images, vectors, or latents from vae.py), '
             'or a toy: checkerboard, moons, spirals, gaussians8 (default: %(default)s)')
    add('--data-dir', default='data', help='where cifar10 and mnist are kept, downloaded there if missing '
                                           '(default: %(default)s)')
    add('--resolution', type=int, help='crop and resize images to this side (default: their own size)')
    add('--xflip', action=argparse.BooleanOptionalAction,
        help='random horizontal flips of images; with --augment > 0, its labelled x-flip takes their place' + table)
    add('--augment', type=float, help="probability p of EDM's non-leaking augmentation (augment.py)" + table)
    add('--cond', action=argparse.BooleanOptionalAction, help='class-conditional training on the labels' + table)
    add('--label-dropout', type=float, help='with --cond, probability of replacing a label by the null class' + table)
    add('--latent-draw', action=argparse.BooleanOptionalAction,
        help="latents: draw each use from the VAE's posterior, mean + std * n (the file's posterior_std); "
             "--no-latent-draw: the posterior mean" + table)
    add('--workers', type=int, default=min(8, os.cpu_count() or 1),
        help='processes that decode an image folder (default: up to 8 CPUs)')
    # network
    add('--model', choices=sorted(PRESETS), help='network preset from model.PRESETS' + table)
    add('--channels', type=int, help='width: U-Net model_channels, DiT hidden_size, MLP hidden' + table)
    add('--dropout', type=float, help="override the preset's dropout (ddpmpp: 0.2, the paper's)")
    # method (imm.IMMConfig; docs/method.md)
    add('--loss', choices=['imm', 'fm'], default='imm',
        help='imm: moment matching (Eq. 12); fm: the flow-matching baseline with the same net (default: %(default)s)')
    add('--particles', type=int, help='M, samples per group sharing (s, r, t); 1 = consistency training' + table)
    add('--schedule', choices=['fm', 'cosine'], help='noise schedule alpha_t, sigma_t (Sec. 4.2)' + table)
    add('--param', choices=['simple_edm', 'euler_fm', 'identity'],
        help='parameterization c_skip, c_out of f_{s,t} (Sec. 4.2)' + table)
    add('--k', type=int, help='r(s,t) steps eta by (eta_max - eta_min) / 2^k' + table)
    add('--a', type=float, help='time weighting exponent on alpha_t (Eq. 13)' + table)
    add('--b', type=float, help='time weighting sigmoid shift (Eq. 13)' + table)
    add('--eps', type=float, help='smallest time, where sampling ends; 0 is allowed except with --param identity'
                                  + table)
    add('--T', type=float, help='largest time, where sampling starts' + table)
    add('--second-time', choices=['s', 't-s'], help='second network condition: 1000 s or 1000 (t - s)' + table)
    add('--min-gap', type=float, help='keep r <= t - min_gap; 0 = off' + table)
    add('--target-fp32', action=argparse.BooleanOptionalAction,
        help='run the stop-gradient target pass in fp32 under bf16/fp16' + table)
    # optimisation
    add('--iters', type=int, help='optimizer steps' + table)
    add('--batch', type=int, help='global batch, split across ranks and micro-batches' + table)
    add('--micro-batch', default='auto',
        help='rows per forward/backward on each rank, a multiple of M; auto: the per-rank batch, halved until it fits '
             '(default: %(default)s)')
    add('--optimizer', choices=OPTIMIZER_NAMES, help='RAdam or AdamW' + table)
    add('--lr', type=float, help='learning rate' + table)
    add('--ema', type=float, help='EMA decay per step' + table)
    add('--grad-clip', type=float, help='clip the gradient norm to this value; 0 = off' + table)
    add('--seed', type=int, default=0, help='seeds the weights and every random draw of training (default: %(default)s)')
    # system
    add('--device', help='cpu or cuda (default: cuda when available); torchrun ranks use cuda:LOCAL_RANK')
    add('--precision', choices=['fp32', 'tf32', 'bf16', 'fp16'],
        help='fp32; TF32 matmuls; bf16 or fp16 autocast (fp16 with a grad scaler)' + table)
    add('--threads', type=int, help="CPU threads for torch; 0 = torch's default" + table)
    add('--compile', action='store_true', help='torch.compile the network (eager, with a warning, if it fails)')
    add('--grad-checkpoint', action=argparse.BooleanOptionalAction,
        help="activation checkpointing of the U-Net's or DiT's blocks: less memory per micro-batch, about one more "
             "forward of time; may change on --resume" + table)
    # output
    add('--out', help='output folder (default: runs/<dataset>)')
    add('--init-from', help="start from the EMA weights of a train.py checkpoint (file or run folder) or of the "
                            "authors' release, e.g. hf://lumaai/imm/cifar10.pt (their network and its settings); the "
                            "optimizer starts fresh")
    add('--resume', nargs='?', const='',
        help='continue from a checkpoint: alone, <out>/ckpt.pt if it exists, else start a new run (the same command '
             'can be rerun after a preemption); PATH: that file, which must exist. Pass the flags of the first run')
    add('--log-every', type=int, help='steps between progress lines and log.jsonl entries' + table)
    add('--ckpt-every', type=int, help='steps between checkpoints' + table)
    add('--sample-every', type=int, help='steps between pictures of 1- and 2-step EMA samples; 0 = never' + table)
    add('--wandb', metavar='PROJECT', help='also log to Weights & Biases, in this project (pip install wandb; '
                                           'WANDB_MODE=offline where nodes have no network); a resumed run continues '
                                           'its wandb run')
    add('--fid-every', type=int, default=0,
        help='steps between FID evaluations of the EMA at 1 and 2 steps; 0 = off (default: %(default)s)')
    add('--fid-n', type=int, default=10_000, help='generated images per FID evaluation (default: %(default)s)')
    add('--fid-ref', help='reference statistics .npz (keys mu, sigma) from `python fid.py ref`')
    add('--fid-weights', help='Inception weights file for FID offline (default: downloaded once)')
    add('--bench', type=int, default=0,
        help='time this many steps (after warm-up) on the chosen config, print one JSON line, write nothing '
             '(default: %(default)s, off)')
    add('--peak-tflops', type=float, help='peak TFLOP/s of one device for MFU in --bench (default: known GPUs)')
    return p


def fill_defaults(args, data, init_config=None):
    """args with every setting left out (None) taken from its kind's column of TABLE (a new Namespace)."""
    args = argparse.Namespace(**vars(args))
    table = defaults(kind_of(data, args.dataset))
    for key, value in table.items():                       # plain values first: a Follows may look at them
        if getattr(args, key) is None and not isinstance(value, Follows):
            setattr(args, key, value)
    takes_augment = init_config.get('augment_dim', 0) == AUGMENT_DIM if init_config is not None \
        else PRESETS[args.model]['arch'] == 'unet'         # a DiT has no augmentation input
    facts = {'labels': data.num_classes > 0, 'cifar10': args.dataset == 'cifar10' and takes_augment,
             'posterior_std': data.kind == 'latent' and data.x.posterior_std is not None}
    for key, rule in table.items():
        if getattr(args, key) is None and isinstance(rule, Follows):
            on = facts[rule.on] if rule.on in facts else getattr(args, rule.on)
            setattr(args, key, rule.cases.get(on, rule.otherwise))
    return args


def describe(args, given, kind, table='TABLE'):
    """The resolved settings as a table, one row per setting of TABLE (or SAMPLING, for sample.py): value
    (* = given as a flag) and source."""
    sources = {row[0]: row[-1] for row in {'TABLE': TABLE, 'SAMPLING': SAMPLING}[table]}
    title = {'TABLE': 'settings', 'SAMPLING': 'sampling'}[table]
    lines = [f"{title} ({kind} column of settings.{table}; * = given as a flag):"]
    width = max(map(len, sources))
    for key in sources:
        mark = '*' if key in given else ' '
        lines.append(f"  {key:<{width}}{mark} {str(getattr(args, key)):<12} {'flag' if key in given else sources[key]}")
    return '\n'.join(lines)


def resolve(args, data, world, init_config=None):
    """From the flags, the data and the number of ranks to everything the run is (no side effects):
    (args with the table's defaults filled in, IMMConfig, network config, M rows per group, micro-batch or 'auto').
    Every range check is here, so bad flags stop the run before anything is built or written.
    init_config: the net config of --init-from's network, which then replaces --model and --channels.
    --bench is a configuration of the normal run: no output folder, nothing logged or saved, warm-up plus timed steps."""
    args = fill_defaults(args, data, init_config)
    if args.latent_draw and data.kind == 'latent' and data.x.posterior_std is None:
        args.latent_draw = False                          # no std to draw with: the mean (train.py prints a note)
    if args.cond and data.num_classes == 0:
        raise UsageError(f"--cond: dataset {args.dataset!r} has no labels; leave out --cond, or use a labelled dataset "
                         f"(cifar10, a toy, a folder with one sub-folder per class, an .npz with 'labels')")
    try:
        cfg = IMMConfig(schedule=args.schedule, param=args.param, particles=args.particles, k=args.k, a=args.a,
                        b=args.b, eps=args.eps, T=args.T, sigma_d=SIGMA_D, second_time=args.second_time,
                        min_gap=args.min_gap, target_fp32=args.target_fp32)
    except ValueError as e:
        raise UsageError(re.sub(r'IMMConfig\.(\w+)=', lambda m: f"--{m.group(1).replace('_', '-')} ", str(e))) from None
    net_config = network_config(args, data, init_config)
    if args.grad_checkpoint and net_config['arch'] == 'mlp':
        raise UsageError("--grad-checkpoint: the network is an MLP, which has no blocks to checkpoint; accepted "
                         "with a U-Net or DiT")
    M = cfg.particles if args.loss == 'imm' else 1        # flow matching: every row is its own group
    check_ranges(args, data)
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
    args.out = args.out or os.path.join('runs', os.path.splitext(os.path.basename(args.dataset.rstrip('/\\')))[0])
    if args.bench:
        args.out = args.resume = None
        args.iters = BENCH_WARMUP + args.bench
        args.log_every = args.ckpt_every = args.sample_every = args.fid_every = 0
    return args, cfg, net_config, M, micro


def check_ranges(args, data):
    """A UsageError naming the first flag out of its range, or that asks for what the data cannot give."""
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
    if args.latent_draw and data.kind != 'latent':
        raise UsageError(f"--latent-draw: {args.dataset!r} holds {data.kind}s; only latents have a posterior to draw "
                         f"from (leave the flag out)")
    if args.fid_every and data.kind != 'image':
        hint = '; score latents once sample.py has decoded them (fid.py calc)' if data.kind == 'latent' else ''
        raise UsageError(f"--fid-every {args.fid_every}: FID needs images, {args.dataset!r} holds {data.kind}s{hint}")
    if args.fid_every and not (args.fid_ref and os.path.isfile(args.fid_ref)):
        raise UsageError(f"--fid-ref {args.fid_ref}: no such file; --fid-every needs reference statistics, "
                         f"made with: python fid.py ref --dataset {args.dataset} --out refs/stats.npz")
    if args.wandb:
        try:
            import wandb  # noqa: F401 (imported here only to say at once when it is missing)
        except ImportError:
            raise UsageError(f"--wandb {args.wandb}: the wandb package is not installed; pip install wandb") from None
    if args.init_from and args.resume is not None:
        raise UsageError(f"--init-from {args.init_from} and --resume: give one; --resume continues a run, "
                         f"--init-from starts a new one from a network's weights")


def network_config(args, data, init_config=None):
    """model.build_net's argument: --model's preset (or --init-from's network) fitted to the data's shape,
    --channels, --dropout, and the augmentation-label input that --augment needs; check_network refuses a network
    that cannot run on the data."""
    shape = list(data.x.shape[1:])
    if init_config is not None:
        return init_network_config(args, data, init_config)
    net_config = dict(PRESETS[args.model], num_classes=data.num_classes if args.cond else 0)
    if net_config['arch'] in ('unet', 'dit'):             # image-shaped data: pixels or latents
        if net_config['arch'] == 'unet':
            net_config['augment_dim'] = AUGMENT_DIM if args.augment else 0
        if data.kind == 'vector':
            raise UsageError(f"--model {args.model} is a {ARCH_NAMES[net_config['arch']]} for images, but "
                             f"{args.dataset!r} holds vectors {shape}; use --model mlp")
        net_config.update(img_resolution=shape[1], in_channels=shape[0])
    elif data.kind != 'vector':
        raise UsageError(f"--model {args.model} is an MLP for vectors, but {args.dataset!r} holds {data.kind}s "
                         f"{shape}; use a U-Net or DiT preset: {', '.join(k for k in PRESETS if k != args.model)}")
    else:
        net_config['dim'] = shape[0]
    if args.channels is not None:
        net_config[WIDTH[net_config['arch']]] = args.channels
    if args.dropout is not None:
        net_config['dropout'] = args.dropout
    check_network(net_config, args, data)
    return net_config


# ---- What each network needs of the data and of its width (model.py); checked before anything is built

WIDTH = {'unet': 'model_channels', 'dit': 'hidden_size', 'mlp': 'hidden'}   # the setting --channels sets
ARCH_NAMES = {'unet': 'U-Net', 'dit': 'DiT', 'mlp': 'MLP'}


def check_network(net_config, args, data):
    """A UsageError naming the first setting with which the network of net_config cannot run on the data: an image
    side the U-Net cannot halve or the DiT cannot cut into patches, a --channels its GroupNorms, heads or time
    embedding cannot split, augmentation for a DiT, a --dropout that is not a probability. The presets' own
    widths fit (tests/test_settings.py)."""
    arch, side = net_config['arch'], net_config.get('img_resolution')
    if args.dropout is not None and not 0 <= args.dropout <= 1:
        raise UsageError(f"--dropout {args.dropout}: accepted a probability in [0, 1]")
    if arch == 'dit' and args.augment:
        raise UsageError(f"--augment {args.augment}: --model {args.model} is a DiT, which has no augmentation input "
                         f"(the paper's ImageNet run uses none); pass --augment 0, or use a U-Net preset")
    if arch in ('unet', 'dit') and side % _side_step(net_config):
        step = _side_step(net_config)
        how = f"halves the image side at each of its {len(net_config['channel_mult'])} levels but the last" \
            if arch == 'unet' else f"cuts images into {step}x{step} patches"
        takes = [p for p in PRESETS if PRESETS[p]['arch'] != 'mlp' and side % _side_step(PRESETS[p]) == 0]
        fixes = ([f"--resolution {_nearest(lambda r: r % step == 0, side)} (crop and resize)"]
                 if data.kind == 'image' else []) + ([f"one of --model {', '.join(takes)}"] if takes else [])
        raise UsageError(f"--model {args.model} {how}, so the side must be a multiple of {step}; {args.dataset!r} "
                         f"holds {data.kind}s of side {side}: "
                         f"{'pass ' + ', or '.join(fixes) if fixes else 'no preset takes that side'}")
    if args.channels is None:
        return
    if arch == 'unet':
        multiples = sorted(_unet_multiples(args.model))
        fits = lambda w: w >= 4 and w % 2 == 0 and all(_group_norm_fits(w * m) for m in multiples)  # noqa: E731
        rule = (f"an even number >= 4 (the time embedding) such that every width in the network, --channels x "
                f"{multiples}, splits into GroupNorm's min(32, width // 4) groups")
    elif arch == 'dit':
        heads = net_config['num_heads']
        fits = lambda w: w > 0 and w % math.lcm(4, heads) == 0  # noqa: E731
        rule = f"a multiple of 4 (the positional embedding) and of its {heads} heads"
    else:
        fits = lambda w: w >= 4 and w % 2 == 0  # noqa: E731
        rule = "an even number >= 4 (the time embedding)"
    if not fits(args.channels):
        raise UsageError(f"--channels {args.channels}: the {ARCH_NAMES[arch]} of --model {args.model} needs {rule}; "
                         f"accepted near {args.channels}: {_nearest(fits, args.channels)}")


def _group_norm_fits(channels):
    """model._group_norm's rule (EDM's): min(32, channels // 4) groups, at least one, that divide the channels."""
    groups = min(32, channels // 4)
    return groups >= 1 and channels % groups == 0


@functools.lru_cache(maxsize=None)
def _unet_multiples(preset):
    """{channels of every GroupNorm of a U-Net preset / its width}: built once on the meta device (no memory, no
    arithmetic), so the rule is read off model.py's own network."""
    config = PRESETS[preset]
    with torch.device('meta'):
        net = build_net(config)
    widths = {m.num_channels for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    return frozenset(w // config['model_channels'] for w in widths)


def _side_step(config):
    """The image side of a U-Net or DiT config must be a multiple of this: 2 per halving, or the patch size."""
    return 2 ** (len(config['channel_mult']) - 1) if config['arch'] == 'unet' else config['patch_size']


def _nearest(fits, value):
    """The nearest positive integers below and above `value` that fit, as 'a or b' (or the one above alone)."""
    below = next((v for v in range(value - 1, 0, -1) if fits(v)), None)
    above = next(v for v in range(max(value + 1, 1), abs(value) + 4096) if fits(v))
    return f"{below} or {above}" if below else str(above)


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
