"""The digits tables of docs/experiments.md ("Digits"): real 8x8 handwritten digits, on a CPU.

Each subcommand trains with train.py's own defaults for small images (`python train.py --dataset digits`, plus the
flags that name the method), samples the EMA weights with imm.sample, scores the samples, and prints a markdown table
to stdout (progress on stderr). Runs and features are kept under --work, so a second call reuses them:

    python docs/digits.py fid --weights default_1.pt   # FID of IMM, IMM M = 1, flow matching at 1/2/4/8 steps
    python docs/digits.py guidance                      # a classifier's accuracy on --cond samples per guidance w
    python docs/digits.py picture                       # the README's picture, docs/demo_digits.png
    python docs/digits.py fid --rows imm:1 fm:1 --iters 20 --work /tmp/x --weights ...   # a smoke test

fid: Frechet distance (fid.py: the TensorFlow Inception, statistics in float64) between all 1,797 samples of a run
and the 1,797 real digits, both repeated from one channel to three; the floor is the FID between two random halves
of the real set. Every row is one training run of the same network and budget; only --loss and --particles differ.
guidance: a logistic regression fitted on the 64 pixels of the real digits (scikit-learn) classifies samples drawn
for each class; the table gives the share classified as the class asked for.
"""

import argparse
import contextlib
import os
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts: repo root
import checkpoint  # noqa: E402
import fid  # noqa: E402
import train  # noqa: E402
from data import load_dataset, to_uint8  # noqa: E402
from util import UsageError, exit_on_usage_error  # noqa: E402
from imm import sample, sampling_times  # noqa: E402

METHODS = {'imm': ('IMM, M = 4', []), 'imm-m1': ('IMM, M = 1', ['--particles', '1']),
           'fm': ('flow matching', ['--loss', 'fm'])}
ROWS = ['imm:1', 'imm:2', 'fm:1', 'fm:2', 'fm:4', 'fm:8', 'imm:4', 'imm:8',      # the order they are computed in
        'imm-m1:1', 'imm-m1:2', 'imm-m1:4', 'imm-m1:8']
GUIDANCE = (1.0, 1.5, 2.0, 3.0)
PER_CLASS = 100         # samples per class for the guidance table


def log(message):
    print(message, file=sys.stderr, flush=True)


def trained(work, name, flags, iters, dataset='digits'):
    """The checkpoint of `python train.py --dataset <dataset> <flags>` in work/name, trained now unless it is there."""
    out = os.path.join(work, name)
    path = os.path.join(out, 'ckpt.pt')
    extra = ['--iters', str(iters)] if iters else []
    if not os.path.isfile(path):
        start = time.time()
        with contextlib.redirect_stdout(sys.stderr):           # its progress lines: stdout is for the table
            status = train.main(['--dataset', dataset, '--out', out, '--device', 'cpu', *flags, *extra])
        if status != 0:
            raise RuntimeError(f'training {name} failed')
        log(f'{name}: trained in {time.time() - start:.0f} s')
    return path


def generate(path, steps, n, seed=0, labels=None, guidance=1.0):
    """n uint8 samples [n, C, H, W] of a checkpoint's EMA in `steps` steps (flow matching: its DDIM sampler)."""
    net, cfg, ckpt = checkpoint.load_for_sampling(path)
    noise = cfg.sigma_d * torch.randn(n, *ckpt['data']['shape'], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = sample(net.eval(), noise, sampling_times(steps, cfg), cfg, labels, guidance=guidance,
                   denoiser=ckpt['args'].get('loss') == 'fm')
    return to_uint8(x)


def inception_net(weights):
    """fid.InceptionFeatures in channels-last layout: the same features (to 1e-5), about 1.3x faster on a CPU."""
    return fid.InceptionFeatures(weights).to(memory_format=torch.channels_last)


def features(cache, images, inception):
    """Inception features [N, 2048] of uint8 images (grey repeated to 3 channels), kept in the .npy `cache`.
    Batches of 10: on one CPU thread larger ones are slower (the 299x299 maps leave the cache)."""
    if os.path.isfile(cache):
        return np.load(cache)
    start, out = time.time(), []
    with torch.no_grad():
        for i in range(0, len(images), 10):
            out.append(inception(images[i:i + 10].expand(-1, 3, -1, -1)).numpy())
    out = np.concatenate(out)
    np.save(cache, out)
    log(f'{cache}: {len(out)} images in {time.time() - start:.0f} s')
    return out


def floor(real_f):
    """(FID between two random halves of the real features, sizes of the halves): what two draws of the data
    itself score with this many images."""
    halves = np.array_split(np.random.default_rng(0).permutation(len(real_f)), 2)
    score = fid.frechet_distance(*fid.feature_stats(real_f[halves[0]]), *fid.feature_stats(real_f[halves[1]]))
    return score, (len(halves[0]), len(halves[1]))


def run_fid(args):
    real = load_dataset('digits').x
    inception = inception_net(args.weights)
    real_f = features(os.path.join(args.work, 'real-features.npy'), real, inception)
    real_stats = fid.feature_stats(real_f)
    floor_fid, halves = floor(real_f)
    scores = {}
    for row in args.rows:
        method, steps = row.split(':')
        path = trained(args.work, method, METHODS[method][1] + args.flags, args.iters)
        gen = generate(path, int(steps), len(real))
        f = features(os.path.join(args.work, f'{method}-{steps}step-features.npy'), gen, inception)
        scores[method, int(steps)] = fid.frechet_distance(*fid.feature_stats(f), *real_stats)
        log(f'{METHODS[method][0]}, {steps} steps: FID {scores[method, int(steps)]:.2f}')
    step_list = sorted({s for _, s in scores})
    lines = ['| method | ' + ' | '.join(f'{s} step' + 's' * (s > 1) for s in step_list) + ' |',
             '|---|' + '---|' * len(step_list)]
    for method, (name, _) in METHODS.items():
        if any(m == method for m, _ in scores):
            lines.append(f'| {name} | ' + ' | '.join(f'{scores[method, s]:.2f}' if (method, s) in scores else ''
                                                     for s in step_list) + ' |')
    lines.append(f'| floor: real half vs real half ({halves[0]} vs {halves[1]}) | {floor_fid:.2f} |'
                 + ' |' * (len(step_list) - 1))
    return lines


def run_guidance(args):
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score
    except ImportError:
        raise UsageError('the guidance table fits a scikit-learn classifier: pip install scikit-learn') from None
    real = load_dataset('digits')
    x, y = real.x.reshape(len(real.x), -1).numpy() / 255, real.labels.numpy()
    classifier = LogisticRegression(max_iter=2000)
    held_out = cross_val_score(classifier, x, y, cv=5).mean()     # how well it reads real digits it has not seen
    classifier.fit(x, y)
    path = trained(args.work, 'cond', ['--cond'] + args.flags, args.iters)
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    lines = ['| guidance w | 1 step | 2 steps |', '|---|---|---|']
    for w in GUIDANCE:
        cells = []
        for steps in (1, 2):
            images = generate(path, steps, len(labels), seed=1, labels=labels, guidance=w)
            cells.append((classifier.predict(images.reshape(len(images), -1).numpy() / 255) == labels.numpy()).mean())
        lines.append(f'| {w} | ' + ' | '.join(f'{100 * c:.1f}%' for c in cells) + ' |')
        log(f'guidance {w}: accuracy at 1/2 steps {cells[0]:.3f} / {cells[1]:.3f}')
    lines.append(f'| real digits (5-fold held-out accuracy) | {100 * held_out:.1f}% | |')
    return lines


def run_picture(args):
    """docs/demo_digits.png: 1- and 2-step samples of the unconditional run beside one row per class (2 steps,
    guidance 1.5) of the --cond run, enlarged 4x with square pixels."""
    from PIL import Image
    uncond = trained(args.work, 'imm', METHODS['imm'][1] + args.flags, args.iters)
    cond = trained(args.work, 'cond', ['--cond'] + args.flags, args.iters)

    def grid(images, columns):                                 # uint8 [N, 1, 8, 8] -> a grid with 1-pixel gaps
        n, _, h, w = images.shape
        rows = (n + columns - 1) // columns
        out = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), 255, np.uint8)
        for i, image in enumerate(images[:, 0].numpy()):
            out[(i // columns) * (h + 1):(i // columns) * (h + 1) + h, (i % columns) * (w + 1):(i % columns) * (w + 1) + w] = image
        return out
    panels = [grid(generate(uncond, steps, 80), 8) for steps in (1, 2)]
    panels.append(grid(generate(cond, 2, 100, seed=1, labels=torch.arange(10).repeat_interleave(10), guidance=1.5), 10))
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 6), 255, np.uint8)
    picture = np.concatenate(sum(([np.pad(p, ((0, height - p.shape[0]), (0, 0)), constant_values=255), gap]
                                  for p in panels), [])[:-1], 1)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_digits.png')
    Image.fromarray(picture).resize((4 * picture.shape[1], 4 * picture.shape[0]), Image.NEAREST).save(out)
    return [f'wrote {out}: 1 step, 2 steps (unconditional), one row per class 0..9 (--cond, 2 steps, guidance 1.5)']


def main(argv=None):
    p = argparse.ArgumentParser(description='The digits tables of docs/experiments.md (see the module docstring).')
    p.add_argument('table', choices=['fid', 'guidance', 'picture'], help='which table (or the README picture) to make')
    p.add_argument('--work', default='runs/digits-tables', help='folder for the runs and cached features')
    p.add_argument('--weights', help='FID Inception weights file (default: downloaded by fid.py)')
    p.add_argument('--rows', nargs='+', default=ROWS, choices=ROWS, help='method:steps rows of the fid table')
    p.add_argument('--iters', type=int, help="training steps of every run (default: train.py's for small images)")
    p.add_argument('--flags', type=shlex.split, default=[],
                   help='more train.py flags for every run, as one string: e.g. the defaults a table was made with')
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    start = time.time()
    lines = {'fid': run_fid, 'guidance': run_guidance, 'picture': run_picture}[args.table](args)
    print('\n'.join(lines + ['', f'{(time.time() - start) / 60:.1f} min in all (runs and features cached under '
                                 f'{args.work} are reused).']))


if __name__ == '__main__':
    with exit_on_usage_error():
        main()
