"""
What mapped latents cost in host memory (docs/performance.md, "Mapped latents: host memory"): a random latent .npz
laid out as vae.py writes one, and the memory of reading all of it once as training does.

    python tools/latent_memory.py write big.npz --n 196608               # x and posterior_std [N, 4, 32, 32]: 3.0 GiB
    python tools/latent_memory.py write means.npz --n 393216 --means-only  # x alone, as vae.py wrote before: 3.0 GiB
    python tools/latent_memory.py epoch big.npz                          # one JSON line: memory before and after
    /usr/bin/time -v python train.py --dataset big.npz --model dit-s2 --batch 16 --iters 2 --device cpu ...

write: float16 posterior means, normal with the release's per-channel statistics (authors.py), posterior stds
uniform in [0.01, 0.1], labels of 1000 classes, the release's latent_mean / latent_std and its VAE's name; built
in memory-mapped .npy files and streamed into the .npz by np.savez, as vae.py does, so writing takes little memory.
epoch: data.load_dataset, then every row once, in batches of 4096 in a random order, gathered and drawn by
data.Latents.batch as a training step on the CPU does; prints the time of each and this process's memory from
/proc/self/status (VmHWM: peak RSS; RssAnon: its own memory; RssFile: mapped file pages, shared with other
processes that map the file and dropped by the kernel when memory is needed), in GiB.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
from authors import DEFAULT_VAE, IMAGENET_LATENT_MEAN, IMAGENET_LATENT_STD  # noqa: E402
from data import load_dataset  # noqa: E402


def write(path, n, means_only):
    mean, std = np.array(IMAGENET_LATENT_MEAN)[:, None, None], np.array(IMAGENET_LATENT_STD)[:, None, None]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as scratch:
        keys = ('x',) if means_only else ('x', 'posterior_std')
        arrays = {k: np.lib.format.open_memmap(os.path.join(scratch, f'{k}.npy'), 'w+', np.float16, (n, 4, 32, 32))
                  for k in keys}
        for i in range(0, n, 4096):
            rows = min(4096, n - i)
            arrays['x'][i:i + rows] = rng.standard_normal((rows, 4, 32, 32), np.float32) * std + mean
            if not means_only:
                arrays['posterior_std'][i:i + rows] = rng.uniform(0.01, 0.1, (rows, 4, 32, 32))
        np.savez(path, **arrays, labels=np.arange(n) % 1000, classes=np.array([f'class{i:04d}' for i in range(1000)]),
                 latent_mean=np.array(IMAGENET_LATENT_MEAN), latent_std=np.array(IMAGENET_LATENT_STD),
                 vae=np.str_(DEFAULT_VAE))
        del arrays
    print(f"wrote {path}: {', '.join(keys)} float16 [{n}, 4, 32, 32], {os.path.getsize(path) / 2 ** 30:.2f} GiB")


def memory():
    """This process's memory from /proc/self/status, in GiB."""
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return {k: round(int(fields[k].split()[0]) / 2 ** 20, 3) for k in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile')}


def epoch(path):
    start = time.time()
    data = load_dataset(path)
    loaded, load_s = memory(), time.time() - start
    latents = data.x.placed(torch.device('cpu'), whole=False, draw=data.x.posterior_std is not None)
    order, start = torch.randperm(len(latents), generator=torch.Generator().manual_seed(0)), time.time()
    for i in range(0, len(latents), 4096):
        rows = order[i:i + 4096]
        latents.batch(rows, None if latents.posterior_std is None else torch.randn(len(rows), *latents.shape[1:]))
    print(json.dumps({'file_gib': round(os.path.getsize(path) / 2 ** 30, 3), 'load_s': round(load_s, 1),
                      'loaded': loaded, 'epoch_s': round(time.time() - start, 1), 'after_epoch': memory()}))


def main(argv=None):
    p = argparse.ArgumentParser(description='Host memory of mapped latents (see the module docstring).')
    sub = p.add_subparsers(dest='command', required=True)
    w = sub.add_parser('write', help='a random latent .npz laid out as vae.py writes one')
    w.add_argument('path', help='the .npz to write')
    w.add_argument('--n', type=int, required=True, help='rows (images)')
    w.add_argument('--means-only', action='store_true', help='x alone, without posterior_std')
    e = sub.add_parser('epoch', help='load a latent file and read every row once; one JSON line')
    e.add_argument('path', help='a latent .npz or .npy')
    args = p.parse_args(argv)
    if args.command == 'write':
        write(args.path, args.n, args.means_only)
    else:
        epoch(args.path)


if __name__ == '__main__':
    main()
