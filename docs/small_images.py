"""The small-image suite of docs/experiments.md ("Small images"): six sets of 8x8 and 16x16 images built from data
that ships inside scikit-learn, and the sweep over them that chose the `small image` column of settings.TABLE.

    python docs/small_images.py sets                               # write the sets: data/small-images/*.npz
    python docs/small_images.py sweep --stage 1 --weights default_1.pt   # one stage of the sweep (resumable)
    python docs/small_images.py report                             # the tables of every stage run so far
    python docs/small_images.py picture                            # docs/small_images.png: real, 1 and 2 steps

The sets (`python train.py --dataset data/small-images/NAME.npz` reads each; uint8 [N, H, W, C], labels where
there are any): the 1,797 digits as they ship (`--dataset digits`), in colour on light grounds, inverted at 16x16,
on photo textures at 16x16, and patches of the two photos scikit-learn ships (china.jpg, flower.jpg) at 8x8 and
16x16, labelled by photo.

A cell of the sweep is one set and one configuration (train.py flags): the configuration's speed is measured with
`train.py --bench` (the fastest of three, so that other jobs on a shared machine cost it as few steps as possible),
it trains for BUDGET_S seconds' worth of those steps with one thread, and its EMA draws 1,000 samples (noise seed 0)
at 1 and 2 steps (and 4 in the final tables), scored by FID-1k: fid.py's TensorFlow Inception against all real
images of the set. The floor is the FID between two random halves of the set: what two draws of the data itself
score with about as few images. Runs, features and results are kept under --work; a second call skips what is done.
Run it as one process with OMP_NUM_THREADS=1: every run and every Inception pass uses one thread.
"""

import argparse
import colorsys
import contextlib
import fcntl
import io
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # docs/: digits.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the scripts: repo root
import digits  # noqa: E402
import fid  # noqa: E402
import train  # noqa: E402
from data import load_dataset  # noqa: E402
from util import exit_on_usage_error  # noqa: E402

BUDGET_S = 300          # seconds of single-thread training per run of the sweep
N_SAMPLES = 1000        # FID-1k
PATCHES = 2000          # images in each set of photo patches

# ---- The sets


def _photos():
    from sklearn.datasets import load_sample_images     # china.jpg and flower.jpg, 427 x 640, inside the package
    return load_sample_images().images


def _resize(images, side, resample=Image.BILINEAR):
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), resample)) for im in images])


def _patches(n, crop, side, seed):
    """n random crop x crop patches of the two photos, box-filtered to side x side; labels: which photo."""
    rng, photos = np.random.default_rng(seed), _photos()
    labels = rng.integers(0, len(photos), n)
    crops = []
    for label in labels:
        photo = photos[label]
        i, j = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
        crops.append(photo[i:i + crop, j:j + crop])
    return _resize(crops, side, Image.BOX), labels


def _digits():
    """The 1,797 digits as uint8 [N, 8, 8] and their labels (data.py's reading of scikit-learn's copy)."""
    d = load_dataset('digits')
    return d.x[:, 0].numpy(), d.labels.numpy()


def _hsv(rng, n, saturation, value):
    """n random colours, uint8 [n, 3]: any hue, saturation and value drawn uniformly from the given ranges."""
    return np.array([colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
                     for _ in range(n)]) * 255


def _ink(strokes, ground, ink):
    """Digits (uint8 [N, H, W], 255 = full stroke) drawn in colour ink [N, 3] over ground [N, H, W, 3]."""
    a = strokes[..., None] / 255.0
    return np.rint(ground * (1 - a) + ink[:, None, None] * a).astype(np.uint8)


def digits_colour():
    strokes, labels = _digits()
    rng = np.random.default_rng(1)
    ground = _hsv(rng, len(strokes), (0.05, 0.35), (0.85, 1.0))[:, None, None] * np.ones((1, 8, 8, 1))
    return _ink(strokes, ground, _hsv(rng, len(strokes), (0.6, 1.0), (0.2, 0.6))), labels


def digits_inverted_16():
    strokes, labels = _digits()
    return (255 - _resize(strokes, 16))[..., None], labels


def digits_texture_16():
    """Digits at 16x16 over photo patches at half contrast, in white on dark patches and black on light ones."""
    strokes, labels = _digits()
    ground, _ = _patches(len(strokes), 32, 16, seed=2)
    ground = 0.5 * ground + 0.5 * ground.mean((1, 2), keepdims=True)
    ink = np.where(ground.mean((1, 2, 3)) < 128, 255.0, 0.0)[:, None] * np.ones((1, 3))
    return _ink(_resize(strokes, 16), ground, ink), labels


SETS = {   # name: (what it is, how it is made; None = a dataset train.py knows by name)
    'digits': ('scikit-learn\'s 8x8 digits as they ship, grey, 10 classes', None),
    'digits-colour': ('the digits in a random dark colour on a random light ground, 8x8 RGB', digits_colour),
    'digits-inverted-16': ('the digits enlarged (bilinear) to 16x16 and inverted: dark on white, grey',
                           digits_inverted_16),
    'digits-texture-16': ('the digits at 16x16 in black or white over 32x32 photo patches box-filtered to 16x16 '
                          'at half contrast, RGB', digits_texture_16),
    'patches-8': (f'{PATCHES} random 24x24 patches of china.jpg and flower.jpg box-filtered to 8x8, RGB, '
                  f'labelled by photo', lambda: _patches(PATCHES, 24, 8, seed=3)),
    'patches-16': (f'{PATCHES} random 32x32 patches of the two photos box-filtered to 16x16, RGB, labelled by '
                   f'photo', lambda: _patches(PATCHES, 32, 16, seed=4)),
}


def dataset_of(name, folder):
    """train.py's --dataset for a set of the suite."""
    return name if SETS[name][1] is None else os.path.join(folder, f'{name}.npz')


def write_sets(args):
    os.makedirs(args.data, exist_ok=True)
    lines = ['| set | images | shape | what it is |', '|---|---|---|---|']
    for name, (what, make) in SETS.items():
        if make is not None:
            images, labels = make()
            np.savez(dataset_of(name, args.data), x=images, labels=labels)
        x = load_dataset(dataset_of(name, args.data)).x
        lines.append(f'| `{name}` | {len(x)} | {list(x.shape[2:]) + [x.shape[1]]} | {what} |')
    return lines


# ---- The sweep: configurations (train.py flags) and the stages that run them

TODAY = ['--model', 'small', '--channels', '32', '--batch', '128', '--lr', '1e-3', '--ema', '0.995', '--k', '10']


def vary(flags, **changes):
    """flags with the value of each --name in changes replaced (or appended)."""
    flags = list(flags)
    for name, value in changes.items():
        flag = '--' + name.replace('_', '-')
        if flag in flags:
            flags[flags.index(flag) + 1] = str(value)
        else:
            flags += [flag, str(value)]
    return flags


CONFIGS = {   # name: flags; a configuration without --iters trains for BUDGET_S seconds' worth of steps
    'base': TODAY,                              # the defaults before this sweep (then 1500 steps), at the budget
    'batch64': vary(TODAY, batch=64), 'batch32': vary(TODAY, batch=32), 'ch16': vary(TODAY, channels=16),
    'lr2e-3': vary(TODAY, lr=2e-3),
    # stage 2: batch 32, the best of stage 1 on every set at 1 step, with one more change each
    'batch16': vary(TODAY, batch=16), 'b32-ch16': vary(TODAY, batch=32, channels=16),
    'b32-lr2e-3': vary(TODAY, batch=32, lr=2e-3), 'b32-k8': vary(TODAY, batch=32, k=8),
    # stage 3: the two changes that helped most in stage 2 (a smaller batch, a narrower net), pushed one step further
    'b16-ch16': vary(TODAY, batch=16, channels=16), 'b32-ch8': vary(TODAY, batch=32, channels=8),
    # the new defaults as `python train.py` runs them: 7500 steps, about 5 minutes at 8x8 and 11.5 at 16x16
    'default': vary(TODAY, batch=32, channels=16, iters=7500),
}
SCREEN = ['digits-colour', 'digits-texture-16', 'patches-16']
CHOSEN = 'b32-ch16'     # the best of stages 1 to 3 at 1 step on every set of SCREEN: the `small image` defaults
STAGES = {   # stage: (sets, configurations, sampling steps scored)
    '1': (SCREEN, ['base', 'batch64', 'ch16', 'batch32', 'lr2e-3'], (1, 2)),
    '2': (SCREEN, ['batch32', 'batch16', 'b32-ch16', 'b32-lr2e-3', 'b32-k8'], (1, 2)),
    '3': (SCREEN, ['b32-ch16', 'b16-ch16', 'b32-ch8'], (1, 2)),
    'before': (list(SETS), ['base'], (1, 2)),
    'final': (list(SETS), [CHOSEN], (1, 2, 4)),
    'default16': (['digits-texture-16'], ['default'], (1, 2, 4)),
}


class Cells:
    """The results of every cell, {"set|config": {...}}, in work/results.json, written after each change. Sweeps
    over different sets may run at once (one per core, `--sets`): each save merges this process's entries into the
    file under a lock, so that none is lost."""

    def __init__(self, work):
        self.path = os.path.join(work, 'results.json')
        self.all, self.mine = self._read(), set()

    def _read(self):
        return json.load(open(self.path)) if os.path.isfile(self.path) else {}

    def get(self, set_name, config):
        """The entry of one cell (made empty if new), saved by this process from now on."""
        self.mine.add(f'{set_name}|{config}')
        return self.all.setdefault(f'{set_name}|{config}', {})

    def step_s(self, side):
        """The kept seconds per step of each configuration on images of this side, {config: s}."""
        self.mine.add('step_s')
        return self.all.setdefault('step_s', {}).setdefault(side, {})

    def save(self):
        with open(self.path + '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = self._read()
            for key in self.mine:
                if key == 'step_s':
                    for side, kept in self.all[key].items():
                        disk.setdefault(key, {}).setdefault(side, {}).update(kept)
                else:
                    disk[key] = self.all[key]
            with open(self.path + '.tmp', 'w') as f:
                json.dump(disk, f, indent=1, sort_keys=True)
            os.replace(self.path + '.tmp', self.path)
            for key, value in disk.items():          # what other processes saved, without replacing our entries
                if key not in self.mine:
                    self.all[key] = value


def cpu_per_step(dataset, flags):
    """CPU seconds per training step of `flags` on `dataset`: train.py --bench 25 less --bench 5, in this process's
    CPU time (one thread)."""
    def cpu_time(steps):
        start = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(['--dataset', dataset, '--device', 'cpu', '--bench', str(steps), *flags])
        return time.process_time() - start
    cpu_time(5)                                         # once for what only a first run pays (imports, caches)
    return (cpu_time(25) - cpu_time(5)) / 20


def step_seconds(cells, dataset, config):
    """Seconds per step of a configuration on images of this side: the base configuration's (the fastest of three
    measurements, kept for the whole sweep) times the configuration's cost relative to it, measured back to back.
    Other jobs on a shared machine slow both alike, so they change the ratio far less than either time."""
    side = f'{load_dataset(dataset).x.shape[-1]}px'
    kept = cells.step_s(side)
    if 'base' not in kept:
        kept['base'] = min(cpu_per_step(dataset, CONFIGS['base']) for _ in range(3))
    if config not in kept:
        kept[config] = kept['base'] * cpu_per_step(dataset, CONFIGS[config]) / cpu_per_step(dataset, CONFIGS['base'])
    cells.save()
    return kept[config]


def run_cell(args, cells, set_name, config, steps_list, real_stats, inception):
    """Train (unless done), sample and score one cell; its entry of `cells` gains iters, times and FIDs."""
    r, flags = cells.get(set_name, config), CONFIGS[config]
    dataset, name = dataset_of(set_name, args.data), os.path.join('runs', set_name, config)
    if 'iters' not in r:
        r['step_s'] = step_seconds(cells, dataset, config) if '--iters' not in flags else None
        r['iters'] = int(flags[flags.index('--iters') + 1]) if '--iters' in flags \
            else max(10, round(BUDGET_S / r['step_s'] / 10) * 10)
        cells.save()
    if 'train_s' not in r:
        shutil.rmtree(os.path.join(args.work, name), ignore_errors=True)   # a run cut short starts over
        start, cpu, load = time.time(), time.process_time(), os.getloadavg()[0]
        path = digits.trained(args.work, name, flags, None if '--iters' in flags else r['iters'], dataset)
        if torch.load(path, map_location='cpu', weights_only=True)['step'] != r['iters']:
            raise RuntimeError(f'{name} stopped before step {r["iters"]} (Ctrl-C or SIGTERM); run the stage again')
        r.update(train_s=round(time.time() - start, 1), train_cpu_s=round(time.process_time() - cpu, 1),
                 load=[round(load, 2), round(os.getloadavg()[0], 2)])
        cells.save()
    path = os.path.join(args.work, name, 'ckpt.pt')
    for steps in steps_list:
        if f'fid{steps}' not in r:
            images = digits.generate(path, steps, N_SAMPLES)
            f = digits.features(os.path.join(args.work, name, f'{steps}step-features.npy'), images, inception)
            r[f'fid{steps}'] = round(fid.frechet_distance(*fid.feature_stats(f), *real_stats), 2)
            cells.save()
    digits.log(f'{set_name} {config}: {r}')


def real_statistics(args, set_name, inception):
    """(mu, sigma) of all real images of a set and its floor (two random halves), the features kept in work/real."""
    os.makedirs(os.path.join(args.work, 'real'), exist_ok=True)
    real = load_dataset(dataset_of(set_name, args.data)).x
    f = digits.features(os.path.join(args.work, 'real', f'{set_name}.npy'), real, inception)
    return fid.feature_stats(f), digits.floor(f)


def sweep(args):
    torch.set_num_threads(1)
    sets, configs, steps_list = STAGES[args.stage]
    if args.sets:
        unknown = sorted(set(args.sets.split(',')) - set(sets))
        if unknown:
            raise SystemExit(f'--sets: {", ".join(unknown)} not in stage {args.stage} ({", ".join(sets)})')
        sets = [s for s in sets if s in args.sets.split(',')]
    cells, inception = Cells(args.work), digits.inception_net(args.weights)
    real = {s: real_statistics(args, s, inception) for s in sets}
    for config in configs:
        for set_name in sets:
            run_cell(args, cells, set_name, config, steps_list, real[set_name][0], inception)
    return report(args, [args.stage])


def report(args, stages=STAGES):
    """A table per stage: one row per configuration and a column per set (FID-1k at 1 / 2 steps, steps trained,
    wall seconds), or for a stage of one configuration a row per set."""
    cells, lines = Cells(args.work), []
    floors = {s: digits.floor(np.load(p))[0] for s in SETS
              if os.path.isfile(p := os.path.join(args.work, 'real', f'{s}.npy'))}
    for stage in stages:
        sets, configs, steps_list = STAGES[stage]
        done = [c for c in configs if any(cells.all.get(f'{s}|{c}', {}).get('fid1') for s in sets)]
        if done:
            lines += ['', f'stage {stage}: FID-1k of {N_SAMPLES} samples against all real images of the set']
            lines += (per_set if len(configs) == 1 else per_config)(cells, sets, done, steps_list, floors)
    return lines


def per_config(cells, sets, configs, steps_list, floors):
    """A row per configuration: each set's FIDs (steps trained, wall seconds), and the mean over the sets of its
    1-step FID over base's (below 1: better than the old defaults at the same budget; the sweep's criterion)."""
    lines = ['| config | ' + ' | '.join(sets) + ' | 1-step FID / base\'s, mean (sets) |', '|---|' + '---|' * (len(sets) + 1)]
    for c in configs:
        cell = lambda r: ' / '.join(f"{r[f'fid{k}']:.1f}" for k in steps_list if f'fid{k}' in r) + \
            (f" ({r['iters']}, {r['train_s']:.0f} s)" if 'train_s' in r else '')   # noqa: E731
        pairs = [(cells.all[f'{s}|{c}']['fid1'], cells.all[f'{s}|base']['fid1']) for s in sets
                 if 'fid1' in cells.all.get(f'{s}|{c}', {}) and 'fid1' in cells.all.get(f'{s}|base', {})]
        ratio = f'{np.mean([a / b for a, b in pairs]):.3f} ({len(pairs)})' if pairs else ''
        lines.append(f'| {c} | ' + ' | '.join(cell(cells.all.get(f'{s}|{c}', {})) for s in sets) + f' | {ratio} |')
    return lines + ['| floor | ' + ' | '.join(f'{floors[s]:.1f}' if s in floors else '' for s in sets) + ' | |']


def per_set(cells, sets, configs, steps_list, floors):
    lines = ['| set | ' + ' | '.join(f'{k} step' + 's' * (k > 1) for k in steps_list) + ' | floor | steps | '
             'training: wall s (CPU s; load before, after) |', '|---|' + '---|' * (len(steps_list) + 3)]
    for s in sets:
        r = cells.all.get(f'{s}|{configs[0]}', {})
        fids = ' | '.join(f"{r[f'fid{k}']:.1f}" if f'fid{k}' in r else '' for k in steps_list)
        time_cell = f"{r['train_s']:.0f} ({r['train_cpu_s']:.0f}; {r['load'][0]:.1f}, {r['load'][1]:.1f})" \
            if 'train_s' in r else ''
        lines.append(f"| `{s}` | {fids} | {floors.get(s, float('nan')):.1f} | {r.get('iters', '')} | {time_cell} |")
    return lines


def run_picture(args, per_set=8, tile=32):
    """docs/small_images.png: a row per set of the suite with real images, then 1-step and 2-step samples of the
    `--config` run of the final stage (noise seed 0), each image enlarged to `tile` pixels with square pixels."""
    from PIL import ImageDraw
    rows, gap, label_w, title_h = [], 8, 130, 16

    def strip(images):                                  # uint8 [N, C, H, W] -> [tile, N * (tile + 2) - 2, 3]
        images = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        scale = tile // images.shape[1]
        big = images.repeat(scale, 1).repeat(scale, 2)
        padded = [np.pad(im, ((0, 0), (0, 2), (0, 0)), constant_values=255) for im in big]
        return np.concatenate(padded, 1)[:, :-2]
    for set_name in SETS:
        real = load_dataset(dataset_of(set_name, args.data)).x
        chosen = real[np.random.default_rng(0).choice(len(real), per_set, replace=False)]
        path = os.path.join(args.work, 'runs', set_name, args.config, 'ckpt.pt')
        if not os.path.isfile(path):
            raise SystemExit(f'{path}: no run; first: python docs/small_images.py sweep --stage final')
        panels = [strip(chosen)] + [strip(digits.generate(path, steps, per_set)) for steps in (1, 2)]
        white = np.full((tile, gap, 3), 255, np.uint8)
        rows.append(np.concatenate([np.full((tile, label_w, 3), 255, np.uint8)] +
                                   sum(([p, white] for p in panels), [])[:-1], 1))
    body = np.concatenate(sum(([r, np.full((4, r.shape[1], 3), 255, np.uint8)] for r in rows), [])[:-1], 0)
    picture = Image.fromarray(np.concatenate([np.full((title_h, body.shape[1], 3), 255, np.uint8), body], 0))
    draw, width = ImageDraw.Draw(picture), per_set * (tile + 2) - 2 + gap
    for i, label in enumerate(['real images', f'1 step ({args.config})', f'2 steps ({args.config})']):
        draw.text((label_w + i * width, 2), label, fill='black')
    for i, set_name in enumerate(SETS):
        draw.text((2, title_h + i * (tile + 4) + tile // 2 - 6), set_name, fill='black')
    picture.save(args.out)
    return [f'wrote {args.out}: a row per set: real images, 1-step and 2-step samples of {args.config}']


def main(argv=None):
    p = argparse.ArgumentParser(description='The small-image suite and sweep (see the module docstring).')
    p.add_argument('command', choices=['sets', 'sweep', 'report', 'picture'],
                   help='write the sets, run a stage, print the tables, or draw docs/small_images.png')
    p.add_argument('--stage', choices=list(STAGES), default='1', help='with sweep: which stage')
    p.add_argument('--sets', help='with sweep: only these sets of the stage, comma-separated (to run one per core)')
    p.add_argument('--data', default='data/small-images', help='folder of the sets (.npz)')
    p.add_argument('--work', default='runs/small-images', help='folder for the runs, features and results.json')
    p.add_argument('--weights', help='FID Inception weights file (default: downloaded by fid.py)')
    p.add_argument('--config', default=CHOSEN, choices=list(CONFIGS), help='with picture: whose samples to show')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'small_images.png'),
                   help='with picture: the PNG to write (default: docs/small_images.png)')
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    lines = {'sets': write_sets, 'sweep': sweep, 'report': report, 'picture': run_picture}[args.command](args)
    print('\n'.join(lines))


if __name__ == '__main__':
    with exit_on_usage_error():
        main()
