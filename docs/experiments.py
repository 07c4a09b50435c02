"""Experiments on 2-D toys that regenerate every table and picture of docs/experiments.md, on a CPU.

Each subcommand trains small MLPs directly with imm.py and model.py (one flat loop, not train.py), measures how
far their samples are from held-out data, prints progress to stderr and a markdown table to stdout, and writes
its pictures into --out (default: this folder):

    python docs/experiments.py toys        # IMM, IMM with M = 1, flow matching; 1/2/4 steps -> exp_toys/exp_steps.png
    python docs/experiments.py particles   # particles M in {1, 2, 4, 8} x mapping k in {10, 12, 15}: exp_particles.png
    python docs/experiments.py params      # parameterization x schedule (paper Table 3) -> exp_params.png
    python docs/experiments.py toys --iters 20 --toys moons --out /tmp/x     # a smoke test, seconds
    python docs/experiments.py score runs/moons runs/spirals # a train.py run's EMA at 1 and 2 steps: one row each
    python docs/experiments.py score runs/checkerboard --steps 1 2 4 8 32 --restart   # other step counts, sampler

Units: the toys standardised per dimension to std sigma_d = 0.5 (data.load_dataset), the scale the method
assumes. Distance: squared MMD with a Gaussian kernel of width WIDTH between EVAL_POINTS samples and as many
held-out points, all pairs included (a V-statistic: never negative, and positive even for two independent draws
of the data, so each table also shows that noise floor). A width of 0.1, a fifth of the data's std, sees the
arms of the spirals and the squares of the checkerboard; in a pilot the energy distance, dominated by large scales,
scored spiral samples without arms nearly as close to the data as the data blurred by noise of std 0.1.
"""

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # imm, model, data: repo root
import checkpoint  # noqa: E402
import data  # noqa: E402
import imm  # noqa: E402
import model  # noqa: E402
import settings  # noqa: E402

NET = dict(arch='mlp', dim=2, hidden=64, depth=3)   # wider nets were slower and no better at this budget
BATCH = 1024           # points per step for every method (M = 4: 256 groups; M = 1: 1024 groups of one)
LR = 1e-3              # RAdam, betas (0.9, 0.999) as the paper; 3e-3 was worse in a pilot
EMA = 0.99             # decay of the sampling weights; 0.999 still remembers the first steps after 2k steps
K = 10                 # mapping k of the toys and params runs, not CIFAR-10's 15: see the particles table
PARAM = settings.defaults('vector')['param']   # train.py's 2-D parameterization, euler_fm, with its eps (0)
METHOD = dict(param=PARAM, eps=settings.EPS.cases.get(PARAM, settings.EPS.otherwise))
WIDTH = 0.1            # Gaussian kernel width of the distance, standardised units
EVAL_POINTS = 4000     # generated and held-out points per distance
EXTENT = (-1.6, 1.6)   # plotted range, standardised units, both axes
PANEL = 160            # pixels per scatter picture


def held_out(ds, n, seed):
    """n fresh points of toy ds (not its training set), standardised with the training set's statistics."""
    points, _ = data.make_toy(ds.name, n, seed=seed)
    return torch.from_numpy((points - ds.mean.double().numpy()) / ds.std.double().numpy() * data.SIGMA_D).float()


def mmd2(a, b):
    """Squared MMD, Gaussian kernel exp(-|u - v|^2 / (2 WIDTH^2)), all pairs with the diagonals, float64."""
    def k(u, v):
        return torch.exp(-torch.cdist(u, v).square() / (2 * WIDTH ** 2)).mean()
    a, b = a.double(), b.double()
    return (k(a, a) + k(b, b) - 2 * k(a, b)).item()


def energy_distance(a, b):
    """2 E|a - b| - E|a - a'| - E|b - b'|, all pairs, float64: large scales dominate it (see the docstring)."""
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def noise_floor(ds, seeds):
    """The distance between two independent held-out draws of the data, one pair per seed."""
    return [mmd2(held_out(ds, EVAL_POINTS, 1000 + seed), held_out(ds, EVAL_POINTS, 2000 + seed)) for seed in seeds]


def train(x_train, cfg, loss, iters, seed, snapshots=()):
    """A fresh MLP trained on x_train with imm.imm_loss (loss='imm') or imm.fm_loss (loss='fm').

    Returns the EMA network and {step: copy of the EMA network} for each step in snapshots.
    """
    torch.manual_seed(seed)                                  # initial weights
    g = torch.Generator().manual_seed(seed)                  # data, noise and times
    net = model.build_net(NET)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.RAdam(net.parameters(), lr=LR, betas=(0.9, 0.999), foreach=True)
    kept = {}
    for step in range(1, iters + 1):
        x = x_train[torch.randint(len(x_train), (BATCH,), generator=g)]
        noise = cfg.sigma_d * torch.randn(x.shape, generator=g)
        if loss == 'fm':
            t, _ = imm.draw_times(BATCH, cfg, g)                     # one time per point
            value = imm.fm_loss(net, x, noise, t, cfg)
        else:
            t, s = imm.draw_times(BATCH // cfg.particles, cfg, g)    # one (t, s) per group of M particles
            value = imm.imm_loss(net, x, noise, t, s, cfg)
        if not torch.isfinite(value):
            raise RuntimeError(f'loss is {value.item()} at step {step} ({cfg}, loss={loss}, seed={seed})')
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        with torch.no_grad():                                        # ema += (1 - EMA) (net - ema)
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - EMA)
        if step in snapshots:
            kept[step] = copy.deepcopy(ema)
    return ema, kept


def generate(net, cfg, steps, seed, loss):
    """EVAL_POINTS samples in `steps` network calls: pushforward for IMM, DDIM on f_{0,t} for flow matching."""
    noise = cfg.sigma_d * torch.randn(EVAL_POINTS, 2, generator=torch.Generator().manual_seed(10_000 + seed))
    return imm.sample(net, noise, imm.sampling_times(steps, cfg), cfg, denoiser=loss == 'fm')


def mean_std(values, scale=1e3):
    """'mean ± std' of values x scale (std over seeds; the mean alone for one seed)."""
    v = np.asarray(values) * scale
    return f'{v.mean():.2f} ± {v.std(ddof=1):.2f}' if len(v) > 1 else f'{v.mean():.2f}'


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Pictures: scatter panels (data.save_scatter) in a grid under a header row, right of a label column.

def scatter_image(points):
    """points [N, 2] as a PANEL x PANEL density picture, drawn by data.save_scatter (which writes a file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'panel.png')
        data.save_scatter(points.numpy(), path, extent=EXTENT, size=PANEL)
        with Image.open(path) as image:
            return image.convert('L')


def save_grid(panels, row_labels, column_labels, path, label_width=120):
    """panels[i][j]: PANEL x PANEL images, written as one labelled grid with 2-pixel gaps."""
    gap, header = 2, 16
    grid = Image.new('L', (label_width + len(panels[0]) * (PANEL + gap), header + len(panels) * (PANEL + gap)), 255)
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(column_labels):
        draw.text((label_width + j * (PANEL + gap) + 4, 2), text, fill=0)
    for i, row in enumerate(panels):
        top = header + i * (PANEL + gap)
        draw.text((4, top + PANEL // 2 - 6), row_labels[i], fill=0)
        for j, panel in enumerate(row):
            grid.paste(panel, (label_width + j * (PANEL + gap), top))
    grid.save(path, optimize=True)


def steps_label(steps):
    return f'{steps} step' + ('s' if steps > 1 else '')


# ---------------------------------------------------------------------------------------------------------
# The three experiments

def run_toys(args):
    """IMM (M = 4), its M = 1 special case and flow matching: same net, same budget, sampled in 1, 2 and 4 steps."""
    methods = [('IMM, M = 4', imm.IMMConfig(particles=4, k=K, **METHOD), 'imm'),
               ('IMM, M = 1', imm.IMMConfig(particles=1, k=K, **METHOD), 'imm'),
               ('flow matching', imm.IMMConfig(**METHOD), 'fm')]
    steps_list = (1, 2, 4)
    toys, seeds = args.toys or list(data.TOYS), range(args.seeds)
    dist, shown, floors, truth = {}, {}, {}, {}    # dist[method, steps, toy]: one distance per seed
    for toy in toys:
        ds = data.load_dataset(toy)
        floors[toy] = noise_floor(ds, seeds)
        truth[toy] = held_out(ds, EVAL_POINTS, 1000)
        for name, cfg, loss in methods:
            for seed in seeds:
                start = time.time()
                net, _ = train(ds.x, cfg, loss, args.iters, seed)
                ref = held_out(ds, EVAL_POINTS, 1000 + seed)
                for steps in steps_list:
                    x = generate(net, cfg, steps, seed, loss)
                    dist.setdefault((name, steps, toy), []).append(mmd2(x, ref))
                    if seed == 0:
                        shown[name, steps, toy] = x
                log(f'{toy}, {name}, seed {seed}: {time.time() - start:.0f} s; MMD^2 x 1e3 at 1/2/4 steps '
                    + ' / '.join(f'{1e3 * dist[name, s, toy][-1]:.2f}' for s in steps_list))

    lines = ['| method | steps | ' + ' | '.join(toys) + ' |', '|---|---|' + '---|' * len(toys)]
    for name, _, _ in methods:
        for steps in steps_list:
            lines.append(f'| {name} | {steps} | ' + ' | '.join(mean_std(dist[name, steps, t]) for t in toys) + ' |')
    lines.append('| noise floor (data vs data) | | ' + ' | '.join(mean_std(floors[t]) for t in toys) + ' |')

    panels, labels = [[scatter_image(truth[t]) for t in toys]], ['held-out data']
    for name, _, _ in methods:
        for steps in steps_list:
            panels.append([scatter_image(shown[name, steps, t]) for t in toys])
            labels.append(f'{name}, {steps_label(steps)}')
    save_grid(panels, labels, toys, os.path.join(args.out, 'exp_toys.png'))
    save_grid([[scatter_image(truth[t]), scatter_image(shown['IMM, M = 4', 1, t]),
                scatter_image(shown['IMM, M = 4', 2, t])] for t in toys],
              toys, ['held-out data', 'IMM, 1 step', 'IMM, 2 steps'], os.path.join(args.out, 'exp_steps.png'),
              label_width=90)
    return lines


def run_particles(args):
    """Particles M x mapping k: the 1-step distance during training and the 2-step one at the end, with seeds."""
    toy, seeds = (args.toys or ['checkerboard'])[0], range(args.seeds)
    ds = data.load_dataset(toy)
    marks = sorted({max(1, args.iters // 4), max(1, args.iters // 2), args.iters})
    ks = (10, 12, 15)
    lines = ['| M | k | ' + ' | '.join(f'1 step, {m} it' for m in marks)
             + ' | 2 steps, end |', '|---|---|' + '---|' * (len(marks) + 1)]
    panels = []
    for particles in (1, 2, 4, 8):
        panels.append([])
        for k in ks:
            cfg = imm.IMMConfig(particles=particles, k=k, **METHOD)
            one, two = {m: [] for m in marks}, []
            for seed in seeds:
                start = time.time()
                net, kept = train(ds.x, cfg, 'imm', args.iters, seed, snapshots=set(marks))
                ref = held_out(ds, EVAL_POINTS, 1000 + seed)
                for m in marks:
                    x = generate(kept[m], cfg, 1, seed, 'imm')
                    one[m].append(mmd2(x, ref))
                two.append(mmd2(generate(net, cfg, 2, seed, 'imm'), ref))
                if seed == 0:
                    panels[-1].append(scatter_image(x))
                log(f'{toy}, M = {particles}, k = {k}, seed {seed}: {time.time() - start:.0f} s; MMD^2 x 1e3 '
                    f'1 step {1e3 * one[args.iters][-1]:.2f}, 2 steps {1e3 * two[-1]:.2f}')
            lines.append(f'| {particles} | {k} | ' + ' | '.join(mean_std(one[m]) for m in marks)
                         + f' | {mean_std(two)} |')
    lines.append('| noise floor (data vs data) | | ' + ' | '.join('' for _ in marks)
                 + f' | {mean_std(noise_floor(ds, seeds))} |')
    save_grid(panels, [f'M = {m}' for m in (1, 2, 4, 8)], [f'k = {k}, 1 step' for k in ks],
              os.path.join(args.out, 'exp_particles.png'), label_width=60)
    return lines


def run_params(args):
    """Parameterization x schedule (paper Table 3); euler_fm exists only for the fm schedule."""
    toy, seeds = (args.toys or ['checkerboard'])[0], range(args.seeds)
    ds = data.load_dataset(toy)
    combos = [('simple_edm', 'fm'), ('simple_edm', 'cosine'), ('euler_fm', 'fm'),
              ('identity', 'fm'), ('identity', 'cosine')]
    steps_list = (1, 2, 4)
    lines = ['| parameterization | schedule | ' + ' | '.join(map(steps_label, steps_list)) + ' |',
             '|---|---|' + '---|' * len(steps_list)]
    panels = []
    for param, schedule in combos:
        cfg = imm.IMMConfig(param=param, schedule=schedule, k=K, T=0.996 if schedule == 'cosine' else 0.994)
        dist = {s: [] for s in steps_list}
        for seed in seeds:
            start = time.time()
            net, _ = train(ds.x, cfg, 'imm', args.iters, seed)
            ref = held_out(ds, EVAL_POINTS, 1000 + seed)
            samples = [generate(net, cfg, steps, seed, 'imm') for steps in steps_list]
            for steps, x in zip(steps_list, samples):
                dist[steps].append(mmd2(x, ref))
            if seed == 0:
                panels.append([scatter_image(x) for x in samples])
            log(f'{toy}, {param} x {schedule}, seed {seed}: {time.time() - start:.0f} s; MMD^2 x 1e3 at 1/2/4 '
                'steps ' + ' / '.join(f'{1e3 * dist[s][-1]:.2f}' for s in steps_list))
        lines.append(f'| {param} | {schedule} | ' + ' | '.join(mean_std(dist[s]) for s in steps_list) + ' |')
    lines.append('| noise floor (data vs data) | | ' + mean_std(noise_floor(ds, seeds)) + ' | | |')
    save_grid(panels, [f'{p} x {s}' for p, s in combos], list(map(steps_label, steps_list)),
              os.path.join(args.out, 'exp_params.png'), label_width=140)
    return lines


def run_score(args):
    """train.py runs (their EMA) at --steps (default 1 and 2) against held-out points: a toy's fresh draw (held_out,
    seed 1000), or --ref, an .npy of held-out points in the data's own units; then the floor, the data against
    itself. --restart samples with the restart sampler (Algorithm 5) instead of pushing forward.
    With --picture, also a grid of the held-out data beside the samples at each step count, one row per run."""
    steps_list = args.steps
    columns = [f'{name} {steps_label(steps)}' for name in ('MMD', 'energy') for steps in steps_list]
    lines = ['| run | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
    floors, panels = [], []
    for run in args.runs:
        net, cfg, ckpt = checkpoint.load_for_sampling(checkpoint.file_of(run))
        units = ckpt['data']
        mean, std = (torch.as_tensor(units[key], dtype=torch.float64) for key in ('mean', 'std'))
        if args.ref:
            held = torch.from_numpy(np.load(args.ref)).double()      # two draws: the reference, then the floor's
            points = [held[:EVAL_POINTS], held[EVAL_POINTS:2 * EVAL_POINTS]]
        else:
            points = [torch.from_numpy(data.make_toy(units['name'], EVAL_POINTS, seed=seed)[0]) for seed in (1000, 2000)]
        ref, other = ((p - mean) / std * data.SIGMA_D for p in points)
        noise = cfg.sigma_d * torch.randn(EVAL_POINTS, 2, generator=torch.Generator().manual_seed(10_000))
        x = [imm.sample(net, noise, imm.sampling_times(steps, cfg), cfg, restart=args.restart,
                        generator=torch.Generator().manual_seed(10_001)).double() for steps in steps_list]
        lines.append(f'| {run} | ' + ' | '.join(f'{1e3 * f(y, ref):.2f}' for f in (mmd2, energy_distance) for y in x) + ' |')
        blanks = [''] * (len(steps_list) - 1)   # the floor has no step count: under the first of each
        floors.append(' | '.join([f'{1e3 * mmd2(other, ref):.2f}', *blanks, f'{1e3 * energy_distance(other, ref):.2f}',
                                  *blanks]) + ' |')
        panels.append([scatter_image(y.float()) for y in (ref, *x)])
    if args.picture:
        save_grid(panels, [os.path.basename(os.path.normpath(run)) for run in args.runs],
                  ['held-out data'] + [f'IMM, {steps_label(steps)}' + (' (restart)' if args.restart else '')
                                       for steps in steps_list], os.path.join(args.out, args.picture))
    lines += [f'| floor of {run} (data vs data) | {floor}' for run, floor in zip(args.runs, floors)]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description='Toy experiments behind docs/experiments.md (see the module docstring).')
    p.add_argument('experiment', choices=['toys', 'particles', 'params', 'score'],
                   help='which table and pictures to make; score: a table of train.py runs (no pictures)')
    p.add_argument('runs', nargs='*', help='score: train.py output folders or checkpoints')
    p.add_argument('--picture', help='score: also write this PNG (in --out) of data and samples per run')
    p.add_argument('--steps', type=int, nargs='+', default=[1, 2], help='score: step counts to sample (default: 1 2)')
    p.add_argument('--restart', action='store_true', help='score: the restart sampler (Algorithm 5), not pushforward')
    p.add_argument('--ref', help='score: .npy of 2 x 4000 held-out points (reference, then floor) for runs on an '
                               '.npy, in its units (default: fresh draws of the toy)')
    p.add_argument('--iters', type=int, default=2000, help='training iterations of every run')
    p.add_argument('--seeds', type=int, help='seeds per configuration (default: 1 for toys, 2 otherwise)')
    p.add_argument('--toys', nargs='+', choices=data.TOYS,
                   help='toys to use (default: all four for toys; checkerboard, the first given, otherwise)')
    p.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)), help='folder for the PNG files')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 is fastest for these tiny nets)')
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.experiment == 'toys' else 2
    for name in ('iters', 'seeds', 'threads'):
        if getattr(args, name) < 1:
            p.error(f'--{name} {getattr(args, name)} must be at least 1')
    if min(args.steps) < 1:
        p.error(f'--steps {" ".join(map(str, args.steps))}: every step count must be at least 1')
    os.makedirs(args.out, exist_ok=True)

    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        lines = {'toys': run_toys, 'particles': run_particles, 'params': run_params,
                 'score': run_score}[args.experiment](args)
    finally:
        torch.set_num_threads(threads)
    seconds = time.time() - start
    if args.experiment == 'score':
        lines += ['', f'Squared MMD (Gaussian kernel, width {WIDTH}) and energy distance, both x 1e3, of {EVAL_POINTS} '
                  f'EMA samples to {EVAL_POINTS} held-out points; lower is better.']
    else:
        lines += ['', f'Squared MMD x 1e3 (Gaussian kernel, width {WIDTH}) to {EVAL_POINTS} held-out points, lower is '
                  f'better; mean ± std over {args.seeds} seed(s); {args.iters} iterations of batch {BATCH} per run; '
                  f'{seconds / 60:.1f} min in all.']
    table = '\n'.join(lines)
    print(table)
    return table


if __name__ == '__main__':
    main()
