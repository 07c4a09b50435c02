"""Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025), the method in one file.

Read top to bottom, next to the paper and docs/method.md (section numbers below are that page's, which states
every formula with the paper's equation numbers): schedules (1) -> DDIM interpolant (2) -> the one-step map
f_{s,t} (3) -> mapping r(s,t) (4.2) -> kernel and weighting (4.3-4.4) -> the loss (4, Eq. 12) -> samplers (5).

The backbone is not here: model.py maps (x, c_noise_t, c_noise_s, labels) -> tensor and knows nothing of IMM.
Functions that compute take their random inputs as arguments (x, noise, t, s), so a test can pin them;
draw_times() is the one place that draws training times.

    import imm, model
    cfg = imm.IMMConfig()                                   # paper's CIFAR-10 settings
    net = model.build_net(model.PRESETS['ddpmpp'])
    t, s = imm.draw_times(B // cfg.particles, cfg)
    loss = imm.imm_loss(net, x, cfg.sigma_d * torch.randn_like(x), t, s, cfg)
    x0 = imm.sample(net, cfg.sigma_d * torch.randn(16, 3, 32, 32), imm.sampling_times(2, cfg), cfg)

Times and schedule coefficients are computed in float64 (r is within ~1e-7 of t near T for k = 15, far below
float32's resolution there); images and network activations stay in their own dtype.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

SCHEDULES = ('fm', 'cosine')
PARAMS = ('simple_edm', 'euler_fm', 'identity')
SECOND_TIMES = ('s', 't-s')


@dataclass
class IMMConfig:
    """Every setting of the method. Defaults are the paper's CIFAR-10 ones (paper Table 5; docs/method.md section 6)."""
    schedule: str = 'fm'          # 'fm' (OT flow matching) or 'cosine' (Sec. 4.2)
    param: str = 'simple_edm'     # parameterization of f_{s,t}: 'simple_edm', 'euler_fm' or 'identity' (Sec. 4.2)
    particles: int = 4            # M: samples per group that share (s, r, t) in the MMD (Eq. 12)
    k: int = 15                   # mapping r(s,t): eta step d = (eta_max - eta_min) / 2^k (App. C.6)
    a: float = 1.0                # time weighting exponent on alpha_t (Eq. 13)
    b: float = 5.0                # time weighting sigmoid shift (Eq. 13)
    eps: float = 0.006            # smallest time (end of sampling)
    T: float = 0.994              # largest time (start of sampling); the paper uses 0.996 for 'cosine'
    sigma_d: float = 0.5          # data standard deviation; the prior is N(0, sigma_d^2 I)
    second_time: str = 's'        # second network condition: 1000 s ('s') or 1000 (t - s) ('t-s')
    min_gap: float = 0.0          # r <= t - min_gap (App. I.6 uses 1e-4 for fp16); 0 = off
    target_fp32: bool = True      # run the stop-gradient target pass in fp32 when autocast is on

    def __post_init__(self):
        def check(ok, name, accepted):
            if not ok:
                raise ValueError(f"IMMConfig.{name}={getattr(self, name)!r} is not valid; accepted: {accepted}")
        check(self.schedule in SCHEDULES, 'schedule', ' or '.join(SCHEDULES))
        check(self.param in PARAMS, 'param', ', '.join(PARAMS))
        check(self.param != 'euler_fm' or self.schedule == 'fm', 'param', "'euler_fm' only with schedule='fm'")
        check(isinstance(self.particles, int) and self.particles >= 1, 'particles', 'an integer >= 1')
        check(isinstance(self.k, int) and self.k >= 0, 'k', 'an integer >= 0')
        check(0 <= self.eps < self.T < 1 and (self.eps > 0 or self.param != 'identity'), 'eps',
              f"0 <= eps < T < 1 (T={self.T}); eps > 0 with param='identity', whose c_skip divides by sigma_eps")
        check(self.sigma_d > 0, 'sigma_d', 'a positive number')
        check(self.second_time in SECOND_TIMES, 'second_time', "'s' or 't-s'")
        check(0 <= self.min_gap < self.T - self.eps, 'min_gap', '0 <= min_gap < T - eps')


def _f64(v, like=None):
    """A time (float or tensor) as a float64 tensor, on like's device if given."""
    device = like.device if torch.is_tensor(like) else None
    return torch.as_tensor(v, dtype=torch.float64, device=device)


def _per_sample(c, x):
    """Broadcast a scalar or a [B] coefficient against x [B, ...], in x's dtype."""
    c = c.to(dtype=x.dtype, device=x.device)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim == 1 else c


# ---------------------------------------------------------------------------------------------------------
# 1. Schedules: x_t = alpha_t x + sigma_t eps (paper Sec. 4.2)

def alpha_sigma(t, cfg):
    """(alpha_t, sigma_t) of the schedule (Sec. 4.2): fm = (1 - t, t); cosine = (cos(pi t/2), sin(pi t/2))."""
    t = _f64(t)
    if cfg.schedule == 'fm':
        return 1 - t, t
    return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)


def eta(t, cfg):
    """eta_t = sigma_t / alpha_t (Sec. 4.2), the noise-to-signal ratio that r(s,t) steps in."""
    t = _f64(t)
    return t / (1 - t) if cfg.schedule == 'fm' else torch.tan(math.pi / 2 * t)


def eta_inverse(n, cfg):
    """t such that eta_t = n: fm n/(1+n); cosine (2/pi) atan(n)."""
    n = _f64(n)
    return n / (1 + n) if cfg.schedule == 'fm' else 2 / math.pi * torch.atan(n)


def logsnr(t, cfg):
    """lambda_t = log(alpha_t^2 / sigma_t^2) = -2 log(eta_t)."""
    return -2 * torch.log(eta(t, cfg))


def dlogsnr_dt(t, cfg):
    """d(lambda_t)/dt in closed form (docs/method.md section 1): fm -2/(t(1-t)); cosine -2 pi / sin(pi t)."""
    t = _f64(t)
    return -2 / (t * (1 - t)) if cfg.schedule == 'fm' else -2 * math.pi / torch.sin(math.pi * t)


# ---------------------------------------------------------------------------------------------------------
# 2. DDIM interpolant (Eq. 11)

def ddim(x_t, x, t, s, cfg):
    """DDIM(x_t, x, t, s) (Eq. 11): the point at time s on the deterministic path through x_t ending at clean x.

    (alpha_s - sigma_s / sigma_t * alpha_t) x + (sigma_s / sigma_t) x_t. t, s: floats or [B] tensors.
    """
    t, s = _f64(t, x_t), _f64(s, x_t)
    alpha_t, sigma_t = alpha_sigma(t, cfg)
    alpha_s, sigma_s = alpha_sigma(s, cfg)
    return _per_sample(alpha_s - sigma_s / sigma_t * alpha_t, x) * x + _per_sample(sigma_s / sigma_t, x_t) * x_t


# ---------------------------------------------------------------------------------------------------------
# 3. The one-step map f_{s,t}(x_t) = c_skip x_t + c_out G(c_in x_t, c_noise(t), c_noise(s)) (App. C.5)

def c_skip_out(s, t, cfg):
    """(c_skip(s,t), c_out(s,t)) of the parameterization (docs/method.md section 3); c_skip = 1, c_out = 0 at s = t."""
    s, t = _f64(s), _f64(t)
    alpha_t, sigma_t = alpha_sigma(t, cfg)
    alpha_s, sigma_s = alpha_sigma(s, cfg)
    if cfg.param == 'simple_edm':
        norm = alpha_t ** 2 + sigma_t ** 2
        return ((alpha_t * alpha_s + sigma_t * sigma_s) / norm,
                -cfg.sigma_d * (alpha_s * sigma_t - alpha_t * sigma_s) / torch.sqrt(norm))
    if cfg.param == 'euler_fm':
        return torch.ones_like(t * s), -(t - s) * cfg.sigma_d
    return sigma_s / sigma_t, alpha_s - sigma_s * alpha_t / sigma_t  # identity: DDIM with G as clean x


def c_in(t, cfg):
    """Input scale 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) (App. C.5; Sec. 4.2 prints a typo, docs/method.md section 3)."""
    alpha_t, sigma_t = alpha_sigma(t, cfg)
    return 1 / (cfg.sigma_d * torch.sqrt(alpha_t ** 2 + sigma_t ** 2))


def one_step(net, x_t, s, t, cfg, labels=None, guidance=1.0, augment_labels=None):
    """f_{s,t}(x_t), the network's jump from time t to time s < t (Sec. 4.2; Eq. 14 for guidance).

    s, t: floats or [B] tensors. Conditions: c_noise(t) = 1000 t and 1000 s (or 1000 (t - s), cfg.second_time).
    With guidance w != 1, G_w = w G(labels) + (1 - w) G(null class), both halves in one batched call (Eq. 14).
    augment_labels (training with EDM augmentation only) go to the network as they are; None means no augmentation.
    """
    B = x_t.shape[0]
    s, t = _f64(s, x_t).expand(B), _f64(t, x_t).expand(B)
    c_skip, c_out = c_skip_out(s, t, cfg)
    x_in = _per_sample(c_in(t, cfg), x_t) * x_t
    c_noise_t = (1000 * t).to(torch.promote_types(x_t.dtype, torch.float32))   # fp32, or float64 for a float64 x
    c_noise_s = (1000 * (s if cfg.second_time == 's' else t - s)).to(c_noise_t.dtype)
    extra = {} if augment_labels is None else {'augment_labels': augment_labels}  # a plain net need not take them
    if guidance == 1.0:
        G = net(x_in, c_noise_t, c_noise_s, labels, **extra)
    else:
        if labels is None or not getattr(net, 'num_classes', 0):
            raise ValueError(f'guidance={guidance} needs class labels and a class-conditional net '
                             f'(net.num_classes > 0); use guidance=1.0 otherwise')
        null = torch.full_like(labels, net.num_classes)
        G_cond, G_null = net(torch.cat([x_in, x_in]), c_noise_t.repeat(2), c_noise_s.repeat(2),
                             torch.cat([labels, null])).chunk(2)
        G = guidance * G_cond + (1 - guidance) * G_null
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * G.to(x_t.dtype)


# ---------------------------------------------------------------------------------------------------------
# 4.2 The mapping r(s,t): a slightly earlier time than t, a fixed step in eta (Sec. 4.2, App. C.6)

def mapping_r(s, t, cfg):
    """r(s,t) = max(s, min(t - min_gap, eta^-1(max(eta_t - d, eta_min)))), d = (eta_max - eta_min) / 2^k.

    s <= r < t; r -> t as k grows. A constant step in eta is a small step in t near T and a larger one near eps.
    """
    s, t = _f64(s), _f64(t)
    eta_min, eta_max = eta(cfg.eps, cfg).item(), eta(cfg.T, cfg).item()
    d = (eta_max - eta_min) / 2 ** cfg.k
    r = eta_inverse(torch.clamp(eta(t, cfg) - d, min=eta_min), cfg)
    return torch.maximum(s, torch.minimum(r, t - cfg.min_gap))


def draw_times(num_groups, cfg, generator=None, device=None):
    """One (t, s) per group: t ~ U(eps, T), s ~ U(eps, t) (Algorithm 1; App. C.7). float64 [num_groups] each."""
    u = torch.rand(2, num_groups, generator=generator, device=device, dtype=torch.float64)
    t = cfg.eps + (cfg.T - cfg.eps) * u[0]
    s = cfg.eps + (t - cfg.eps) * u[1]
    return t, s


# ---------------------------------------------------------------------------------------------------------
# 4.3-4.4 Laplace kernel, MMD and time weighting

def kernel_weight(s, t, cfg):
    """w~(s,t) = 1 / |c_out(s,t)| of the parameterization in use (docs/method.md section 4.3): the kernel's scale tracks the jump."""
    return 1 / c_skip_out(s, t, cfg)[1].abs()


def laplace_mmd(y_t, y_r, w_kernel):
    """Per-group MMD^2 V-statistic, diagonal included (Eq. 12), with k(u, v) = exp(-w~ max(|u-v|, 1e-8) / D).

    y_t, y_r: [G, M, ...] particles; w_kernel: [G]. Returns [G]. Distances are computed exactly (no |u|^2 + |v|^2
    - 2uv shortcut, which loses the small distances that matter when r is close to t), in fp32 at least.
    """
    G, M = y_t.shape[:2]
    dtype = torch.promote_types(y_t.dtype, torch.float32)
    z = torch.cat([y_t.reshape(G, M, -1), y_r.reshape(G, M, -1)], dim=1).to(dtype)
    D = z.shape[-1]
    dist = torch.cdist(z, z, compute_mode='donot_use_mm_for_euclid_dist').clamp_min(1e-8)
    K = torch.exp(-w_kernel.to(dtype).reshape(G, 1, 1) * dist / D)
    return (K[:, :M, :M].mean((1, 2)) + K[:, M:, M:].mean((1, 2)) - 2 * K[:, :M, M:].mean((1, 2)))


def weighting(t, cfg):
    """w(s,t) = 0.5 sigmoid(b - lambda_t) (-d lambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2) (Eq. 13).

    For fm, 0.5 sigmoid(b - lambda)(-lambda') is evaluated in the stable closed form
    t / ((1 - t)(t^2 + e^-b (1 - t)^2)) (docs/method.md section 4.4); it depends on t only.
    """
    t = _f64(t)
    alpha_t, sigma_t = alpha_sigma(t, cfg)
    if cfg.schedule == 'fm':
        core = t / ((1 - t) * (t ** 2 + math.exp(-cfg.b) * (1 - t) ** 2))
    else:
        core = 0.5 * torch.sigmoid(cfg.b - logsnr(t, cfg)) * -dlogsnr_dt(t, cfg)
    return core * alpha_t ** cfg.a / (alpha_t ** 2 + sigma_t ** 2)


# ---------------------------------------------------------------------------------------------------------
# 4. The training objective (Eq. 12 with the weighting of Eq. 13; Algorithm 1)

def imm_loss(net, x, noise, t, s, cfg, labels=None, augment_labels=None):
    """The IMM loss for B samples in B/M groups of M particles sharing (s, r, t) (Eq. 12, Algorithm 1).

    x, noise: [B, ...] (noise already scaled by sigma_d); t, s: [B // M], one per group; group g holds rows
    g*M .. g*M + M - 1. Two forward passes: y_t = f_{s,t}(x_t) with gradient, and the target y_r = f_{s,r}(x_r)
    with the same weights under no_grad (not EMA), the same dropout mask, in fp32 if cfg.target_fp32.
    Returns the mean over groups of w(s,t) * MMD^2_g; deterministic given its arguments.
    """
    M, B = cfg.particles, x.shape[0]
    if B % M or t.shape != (B // M,) or s.shape != t.shape:
        raise ValueError(f'imm_loss: batch {B} must be a multiple of particles M={M}, with t and s of shape '
                         f'[{B // M}]; got t {tuple(t.shape)}, s {tuple(s.shape)}')
    t, s = _f64(t, x), _f64(s, x)
    r = mapping_r(s, t, cfg)
    t_i, s_i, r_i = (v.repeat_interleave(M) for v in (t, s, r))  # per-sample times
    alpha_t, sigma_t = alpha_sigma(t_i, cfg)
    x_t = _per_sample(alpha_t, x) * x + _per_sample(sigma_t, x) * noise
    x_r = ddim(x_t, x, t_i, r_i, cfg)  # same x and noise: "re-using x_t" (docs/method.md section 4.1)

    # Target pass first, inside fork_rng, so the gradient pass below replays the same random stream and draws
    # the same dropout mask. Stop-gradient with the online weights; fp32 keeps the target sharp (App. I.6).
    devices = [x.device] if x.device.type == 'cuda' else []
    precision = torch.autocast(x.device.type, enabled=False) if cfg.target_fp32 else contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), torch.no_grad(), precision:
        y_r = one_step(net, x_r, s_i, r_i, cfg, labels, augment_labels=augment_labels)
    y_t = one_step(net, x_t, s_i, t_i, cfg, labels, augment_labels=augment_labels)

    with torch.autocast(x.device.type, enabled=False):
        mmd = laplace_mmd(y_t.reshape(B // M, M, -1), y_r.reshape(B // M, M, -1), kernel_weight(s, t, cfg))
        return (weighting(t, cfg).to(mmd.dtype) * mmd).mean()


def fm_loss(net, x, noise, t, cfg, labels=None, augment_labels=None):
    """Flow-matching baseline with the same net and parameterization: regress x_hat = f_{0,t}(x_t) onto x.

    t: [B], one per sample. Weighted by 1 / c_out(0,t)^2, so the network's own target has unit scale (EDM's
    choice); for euler_fm this is exactly the velocity MSE of flow matching (up to sigma_d^2).
    Sample with sample(..., denoiser=True): DDIM steps on x_hat (Eq. 11).
    """
    t = _f64(t, x)
    zero = torch.zeros_like(t)
    alpha_t, sigma_t = alpha_sigma(t, cfg)
    x_t = _per_sample(alpha_t, x) * x + _per_sample(sigma_t, x) * noise
    x_hat = one_step(net, x_t, zero, t, cfg, labels, augment_labels=augment_labels)
    w = 1 / c_skip_out(zero, t, cfg)[1] ** 2
    err = (x_hat.float() - x.float()).pow(2).reshape(x.shape[0], -1).mean(1)
    return (w.float() * err).mean()


# ---------------------------------------------------------------------------------------------------------
# 5. Sampling (Sec. 4.3, App. F; Algorithms 2 and 5)

def sampling_times(steps, cfg, two_step_eta=1.4):
    """Time grid T = t_N > ... > t_0 = eps for `steps` jumps (Sec. 4.3): uniform in t, except that 2 steps put t1
    at eta(t1) = two_step_eta when it is given. The authors' release samples CIFAR-10 at 1 step and at 2 steps with
    eta(t1) = 1.4 (t1 = 0.5833 for fm), and ImageNet on uniform grids at every step count (two_step_eta=None);
    settings.SAMPLING picks one per kind of checkpoint."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f'steps must be an integer >= 1, got {steps!r}')
    if steps == 2 and two_step_eta is not None:
        return [cfg.T, eta_inverse(two_step_eta, cfg).item(), cfg.eps]
    return torch.linspace(cfg.T, cfg.eps, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def sample(net, noise, times, cfg, labels=None, guidance=1.0, restart=False, generator=None, denoiser=False):
    """Few-step sampling from x_{t_N} = noise (already scaled by sigma_d) down to t_0 = times[-1] (Sec. 4.3).

    Pushforward (default, Algorithm 2): x_{t_{i-1}} = f_{t_{i-1}, t_i}(x_{t_i}).
    Restart (Algorithm 5): jump to the end, x_end = f_{t_0, t_i}(x_{t_i}), then re-noise it to t_{i-1} with
    fresh noise from `generator`. denoiser=True: for a net trained with fm_loss, each jump is a DDIM step (Eq. 11)
    on the clean estimate f_{0,t}(x_t), the usual deterministic sampler of flow matching.
    The state x is kept in fp32 whatever precision the network runs in (float64 for a float64 network).
    """
    times = [float(v) for v in times]
    if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f'times must hold at least 2 strictly decreasing values, got {times}')

    def jump(x, s, t):  # x at time t -> time s
        if denoiser:
            return ddim(x, one_step(net, x, 0.0, t, cfg, labels, guidance).to(x.dtype), t, s, cfg)
        return one_step(net, x, s, t, cfg, labels, guidance).to(x.dtype)

    # A float64 network keeps the state in float64; a plain function (not an nn.Module, as in tests) runs in fp32.
    wide = isinstance(net, torch.nn.Module) and any(p.dtype == torch.float64 for p in net.parameters())
    x, t_end = noise.to(torch.float64 if wide else torch.float32), times[-1]
    for t_cur, t_next in zip(times[:-1], times[1:]):
        if restart and t_next != t_end:
            alpha, sigma = alpha_sigma(t_next, cfg)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = alpha.item() * jump(x, t_end, t_cur) + sigma.item() * cfg.sigma_d * z
        else:
            x = jump(x, t_next, t_cur)
    return x
