"""Backbones for IMM: the DDPM++ U-Net of the paper's CIFAR-10 setting (and smaller ones of its layout for CPU
runs), the DiT of its ImageNet setting, and a residual MLP for 2-D data.

Nothing here knows IMM (that is imm.py). Every network keeps one contract:
    net(x, c_noise_t, c_noise_s, labels=None, augment_labels=None) -> tensor shaped like x
where c_noise_t = 1000 t and c_noise_s = 1000 s (or 1000 (t - s)) are [B] floats, labels are ints in
[0, num_classes], the value num_classes being the null class (label dropout, classifier-free guidance), and
augment_labels ([B, augment_dim] floats, None = zeros) describe an EDM augmentation of x (0 at sampling).

`UNet` computes exactly the network of the authors' CIFAR-10 release (lumalabs/imm: EDM's `SongUNet` as DDPM++,
`s_embed=True`, configs/cifar10_generate_images.yaml): for the same weights the same function, to float32
rounding. Checked by loading a network built from the authors' own code through authors.load_pickle
and comparing outputs (docs/walkthrough.md, "Where our network equals the authors'"; tests/test_authors.py).
Its conditioning, in their order: the sinusoidal embedding of c_noise_t (as [sin, cos]) plus a linear map of
the scaled one-hot label (the null class is the all-zero vector) plus a linear map of the augmentation labels
go through the t MLP; the sinusoidal embedding of c_noise_s goes through its own MLP; the two are added and
passed through a SiLU (paper App. I.1). Initialisation is theirs (EDM's): xavier-uniform weights, zero
biases, qkv x sqrt(0.2), and the last conv of each block, the attention projection and the output conv
x 1e-5, so at initialisation f_{s,t}(x_t) is within ~1e-5 of c_skip(s,t) x_t, the DDIM jump of a zero prediction.
The MLP keeps PyTorch's default initialisation throughout, its output layer included (a zero one trained the
2-D toys slower: docs/experiments.md, "Toy defaults that differ from the paper").

`DiT` computes exactly the network of the authors' ImageNet release (lumalabs/imm training/dit.py: Peebles & Xie's
DiT with `s_embed=True`, configs/im256_generate_images.yaml): for the same weights the same function, bit for bit
in float32 and float64 on CPU. Checked by loading a network built from the authors' own code (random weights, the
zero-initialised layers too) through authors.load_pickle and comparing outputs, f_{s,t} and 1-4 step
samples with guidance (docs/walkthrough.md, section 9; tests/test_authors.py). Its conditioning is
emb = MLP_t(DiT sinusoids of c_noise_t) + MLP_s(... of c_noise_s) + a learned row per class (row num_classes: the
null class); each block and the final layer read shift/scale/gate from SiLU(emb) (adaLN-Zero). Initialisation is
DiT's: the modulations and the output layer are zero, so the output is exactly zero at initialisation. DiT-XL/2
(model.PRESETS['dit-xl2']) has 676.44M parameters, 118.6 G multiply-adds per forward on 32x32x4 latents.

`net.grad_checkpoint = True` (train.py --grad-checkpoint) makes the U-Net and the DiT recompute each block's
activations in the backward pass instead of keeping them (torch.utils.checkpoint): less memory, the same gradients.
It is a switch of the module, not part of its config.

    import model
    net = model.build_net(model.PRESETS['ddpmpp'])      # paper's CIFAR-10 net, 56.06M parameters
    net = model.build_net({**model.PRESETS['tiny'], 'num_classes': 10})
    net = model.build_net(model.PRESETS['dit-xl2'])     # paper's ImageNet net (SD-VAE latents), 676.44M parameters
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PRESETS = {
    # DDPM++ as in the paper's CIFAR-10 run (Table 5; EDM's SongUNet 'ddpmpp' layout).
    'ddpmpp': dict(arch='unet', img_resolution=32, in_channels=3, model_channels=128, channel_mult=[2, 2, 2],
                   num_blocks=4, attn_resolutions=[16], dropout=0.2, num_classes=0, augment_dim=0),
    # The same layout, small enough for CPU tests (two levels, one block each).
    'tiny': dict(arch='unet', img_resolution=32, in_channels=3, model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[16], dropout=0.0, num_classes=0, augment_dim=0),
    # Small images (up to 16x16, e.g. the 8x8 digits) on a CPU: two levels, one block each, no attention but the
    # one the bottom of the decoder always has.
    'small': dict(arch='unet', img_resolution=8, in_channels=1, model_channels=32, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[], dropout=0.0, num_classes=0, augment_dim=0),
    # 2-D toys.
    'mlp': dict(arch='mlp', dim=2, hidden=256, depth=4, dropout=0.0, num_classes=0),
    # DiT sizes S/B/L/XL, patch 2 or 4, for ImageNet 256 as 32x32x4 SD-VAE latents (App. I; XL/2 is the
    # paper's model). Sizes as in Peebles & Xie, Table 1: (hidden_size, depth, num_heads).
    **{f'dit-{size}{patch}': dict(arch='dit', img_resolution=32, in_channels=4, patch_size=patch, hidden_size=hidden,
                                  depth=depth, num_heads=heads, mlp_ratio=4.0, num_classes=1000, dropout=0.0)
       for size, (hidden, depth, heads) in {'s': (384, 12, 6), 'b': (768, 12, 12), 'l': (1024, 24, 16),
                                            'xl': (1152, 28, 16)}.items() for patch in (2, 4)},
}


def build_net(config):
    """The network described by config = {'arch': 'unet' | 'mlp' | 'dit', **constructor arguments} (net.config)."""
    archs = {'unet': UNet, 'mlp': MLP, 'dit': DiT}
    config = dict(config)
    arch = config.pop('arch', None)
    if arch not in archs:
        raise ValueError(f"network arch {arch!r} is not known; accepted: {', '.join(archs)}")
    return archs[arch](**config)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of a noise condition, fed as [sin, cos] to its own 2-layer MLP (App. I.1)."""

    def __init__(self, freq_channels, emb_channels, max_period=10000):
        super().__init__()
        self.half, self.max_period = freq_channels // 2, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_channels, emb_channels), nn.SiLU(),
                                 nn.Linear(emb_channels, emb_channels))

    def sinusoids(self, c_noise):
        # In float64 whatever the net's dtype (no buffer, so net.float() cannot round it): c_noise reaches 1000 rad,
        # where float32 angles would be off by ~1e-4 (the authors compute these in float64 too).
        freqs = self.max_period ** (-torch.arange(self.half, dtype=torch.float64, device=c_noise.device)
                                    / (self.half - 1))
        angles = c_noise.double()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1).to(self.mlp[0].weight.dtype)

    def forward(self, c_noise, extra=0):
        """extra: what is added to the sinusoids before the MLP (the class and augmentation terms)."""
        return self.mlp(self.sinusoids(c_noise) + extra)


class Conditioning(nn.Module):
    """emb = SiLU(MLP_t(sin(c_noise_t) + label term + augmentation term) + MLP_s(sin(c_noise_s))) (App. I.1).

    The label term is a linear map of the one-hot label scaled by sqrt(num_classes); the null class is the
    all-zero vector (only the bias remains). The augmentation term is a bias-free linear map (EDM)."""

    def __init__(self, freq_channels, emb_channels, num_classes, augment_dim=0):
        super().__init__()
        self.num_classes = num_classes
        self.embed_t = TimeEmbedding(freq_channels, emb_channels)
        self.embed_s = TimeEmbedding(freq_channels, emb_channels)
        self.embed_label = nn.Linear(num_classes, freq_channels) if num_classes else None
        self.embed_augment = nn.Linear(augment_dim, freq_channels, bias=False) if augment_dim else None

    def forward(self, c_noise_t, c_noise_s, labels, augment_labels):
        extra = 0
        if self.embed_label is not None:
            if labels is None:  # unconditional use of a conditional net = the null class
                labels = torch.full_like(c_noise_t, self.num_classes, dtype=torch.long)
            one_hot = F.one_hot(labels, self.num_classes + 1)[:, :self.num_classes]  # null class -> all zeros
            extra = self.embed_label(one_hot.to(self.embed_label.weight.dtype) * math.sqrt(self.num_classes))
        elif labels is not None:
            raise ValueError('labels were given to an unconditional net (num_classes=0); '
                             'build it with num_classes > 0 for class-conditional use')
        if self.embed_augment is not None and augment_labels is not None:
            extra = extra + self.embed_augment(augment_labels.to(self.embed_augment.weight.dtype))
        elif augment_labels is not None:
            raise ValueError('augment_labels were given to a net without an augmentation input (augment_dim=0); '
                             'build it with augment_dim > 0 to train with augmentation')
        return F.silu(self.embed_t(c_noise_t, extra) + self.embed_s(c_noise_s))


def _run_block(block, h, emb, grad_checkpoint):
    """block(h, emb); with grad_checkpoint, and only where a gradient is being recorded, without keeping the
    block's activations: they are recomputed in the backward pass (torch.utils.checkpoint, which replays the RNG
    state, so dropout draws the same mask). Under no_grad (IMM's target pass, sampling) it is the plain call."""
    if grad_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, h, emb, use_reentrant=False)
    return block(h, emb)


def _scale_init(layer, scale):
    """Shrink a layer's initial weights (scale 0 zeroes it), EDM-style, so a residual branch starts near zero."""
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.zero_()
    return layer


def _group_norm(channels):
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=1e-6)


class UNetBlock(nn.Module):
    """DDPM++ residual block: GN-SiLU-conv, add the embedding, GN-SiLU-dropout-conv, skip; optional up/down
    (nearest / 2x2 average) and single-head self-attention. Sums are scaled by sqrt(0.5) (EDM skip scale)."""

    def __init__(self, in_ch, out_ch, emb_ch, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_ch, self.up, self.down = in_ch, up, down
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = _group_norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_ch, out_ch)
        self.norm1 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None
        self.attention = attention
        if attention:
            self.norm2 = _group_norm(out_ch)
            self.qkv = nn.Conv2d(out_ch, out_ch * 3, 1)  # output channel 3 c + j is (q, k, v)[j] of channel c
            self.proj = nn.Conv2d(out_ch, out_ch, 1)

    def resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode='nearest')
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        x = self.resample(x)
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.attention:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, C, 3, H * W).transpose(1, 3).unbind(2)  # [B, HW, C]
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])  # 1 head: [B, 1, HW, C]
            x = (x + self.proj(a[:, 0].transpose(1, 2).reshape(B, C, H, W))) * self.skip_scale
        return x


class UNet(nn.Module):
    """DDPM++ U-Net (the paper's CIFAR-10 backbone, Table 5) with IMM's second time condition: the
    authors' SongUNet (module docstring)."""

    def __init__(self, img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                 num_blocks=4, attn_resolutions=(16,), dropout=0.2, num_classes=0, augment_dim=0):
        super().__init__()
        self.config = dict(arch='unet', img_resolution=img_resolution, in_channels=in_channels,
                           model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, num_classes=num_classes,
                           augment_dim=augment_dim)
        self.num_classes = num_classes
        self.grad_checkpoint = False  # a run-time switch (train.py --grad-checkpoint), not part of the config
        emb_ch = model_channels * 4
        self.cond = Conditioning(model_channels, emb_ch, num_classes, augment_dim)
        block = dict(emb_ch=emb_ch, dropout=dropout)

        # Encoder: a stem conv, then per level an optional downsampling block and num_blocks blocks.
        self.enc = nn.ModuleList()
        skip_channels = []
        ch = model_channels
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels.append(ch)
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(UNetBlock(ch, ch, down=True, **block))
                skip_channels.append(ch)
            for _ in range(num_blocks):
                self.enc.append(UNetBlock(ch, model_channels * mult, attention=res in attn_resolutions, **block))
                ch = model_channels * mult
                skip_channels.append(ch)

        # Decoder: two blocks (one with attention) at the bottom, then per level num_blocks + 1 blocks that each
        # take one encoder skip, and an upsampling block between levels.
        self.dec = nn.ModuleList()
        self.takes_skip = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec += [UNetBlock(ch, ch, attention=True, **block), UNetBlock(ch, ch, **block)]
            else:
                self.dec.append(UNetBlock(ch, ch, up=True, **block))
            self.takes_skip += [False] * (1 if level < len(channel_mult) - 1 else 2)
            for i in range(num_blocks + 1):
                attention = i == num_blocks and res in attn_resolutions
                self.dec.append(UNetBlock(ch + skip_channels.pop(), model_channels * mult,
                                          attention=attention, **block))
                ch = model_channels * mult
                self.takes_skip.append(True)
        self.out_norm = _group_norm(ch)
        self.out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.init_as_edm()

    @torch.no_grad()
    def init_as_edm(self):
        """EDM's initialisation, as in the authors' SongUNet: xavier-uniform weights and zero biases everywhere;
        qkv x sqrt(0.2); the residual branches' last layers and the output conv x 1e-5 (start near zero)."""
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        for blk in [*self.enc, *self.dec]:
            blk.conv1.weight.mul_(1e-5)
            if blk.attention:
                blk.qkv.weight.mul_(math.sqrt(0.2))
                blk.proj.weight.mul_(1e-5)
        self.out_conv.weight.mul_(1e-5)

    def forward(self, x, c_noise_t, c_noise_s, labels=None, augment_labels=None):
        emb = self.cond(c_noise_t, c_noise_s, labels, augment_labels)
        h = self.stem(x)
        skips = [h]
        for blk in self.enc:
            h = _run_block(blk, h, emb, self.grad_checkpoint)
            skips.append(h)
        for blk, takes_skip in zip(self.dec, self.takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = _run_block(blk, h, emb, self.grad_checkpoint)
        return self.out_conv(F.silu(self.out_norm(h)))


class MLP(nn.Module):
    """Residual MLP for vector data [B, dim] (2-D toys), with the same contract as the U-Net (no augmentation
    input: augment_labels must be None)."""

    def __init__(self, dim=2, hidden=256, depth=4, dropout=0.0, num_classes=0):
        super().__init__()
        self.config = dict(arch='mlp', dim=dim, hidden=hidden, depth=depth, dropout=dropout,
                           num_classes=num_classes)
        self.num_classes = num_classes
        self.cond = Conditioning(hidden, hidden, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm=nn.LayerNorm(hidden), emb=nn.Linear(hidden, hidden), fc1=nn.Linear(hidden, hidden * 2),
            drop=nn.Dropout(dropout), fc2=_scale_init(nn.Linear(hidden * 2, hidden), 1e-5),
        )) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        # PyTorch's default init, not zero: a zero output layer blocks every other gradient at step 0 and leaves the
        # IMM loss near its floor for hundreds of steps; on the toys it trained slower (docs/experiments.md).
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, c_noise_t, c_noise_s, labels=None, augment_labels=None):
        emb = self.cond(c_noise_t, c_noise_s, labels, augment_labels)
        h = self.inp(x)
        for b in self.blocks:
            h = h + b.fc2(b.drop(F.silu(b.fc1(b.norm(h) + b.emb(emb)))))
        return self.out(F.silu(self.out_norm(h)))


# ---- DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), as the authors' ImageNet release --------

def _sinusoids_cos_sin(c_noise, channels, max_period=10000):
    """DiT's embedding of a noise condition: [cos, sin] at frequencies max_period^(-i / half), i < half (the U-Net's
    differ: [sin, cos] and a last frequency of exactly 1/max_period). float64, as the authors compute it."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=c_noise.device) / half)
    angles = c_noise.double()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class DiTTimeEmbedding(nn.Module):
    """A noise condition -> its 256 DiT sinusoids -> a 2-layer MLP (one per time condition, App. I.1)."""

    def __init__(self, hidden_size, freq_channels=256):
        super().__init__()
        self.freq_channels = freq_channels
        self.mlp = nn.Sequential(nn.Linear(freq_channels, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, c_noise):
        return self.mlp(_sinusoids_cos_sin(c_noise, self.freq_channels).to(self.mlp[0].weight.dtype))


def _modulate(h, shift, scale):
    """adaLN: the (affine-free) LayerNorm's output scaled and shifted per sample by the conditioning."""
    return h * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: the conditioning gives shift, scale and a gate for the attention and for the
    MLP branch; the gates start at zero, so each block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # output row (j, head, d) is (q, k, v)[j] of that head
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, h, emb):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(emb)).chunk(6, dim=1)
        B, N, C = h.shape
        q, k, v = self.qkv(_modulate(self.norm1(h), shift1, scale1)).reshape(B, N, 3, self.num_heads, -1) \
            .permute(2, 0, 3, 1, 4).unbind(0)                                    # each [B, heads, N, C / heads]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        h = h + gate1[:, None] * self.proj(a)
        m = self.fc1(_modulate(self.norm2(h), shift2, scale2))
        return h + gate2[:, None] * self.dropout(self.fc2(self.dropout(F.gelu(m, approximate='tanh'))))


def _sincos_positions(hidden_size, grid_size):
    """DiT's fixed 2-D positional embedding [grid^2, hidden]: the first half of the channels encodes the patch's
    column, the second half its row, each as [sin, cos] at frequencies 10000^(-i / (hidden / 4)) (MAE's recipe),
    computed in float64."""
    freqs = 1.0 / 10000 ** (torch.arange(hidden_size // 4, dtype=torch.float64) / (hidden_size / 4))
    pos = torch.arange(grid_size, dtype=torch.float64)
    row, col = pos.repeat_interleave(grid_size), pos.repeat(grid_size)      # patch i = (row i // g, column i % g)
    embed = [torch.cat([(p[:, None] * freqs).sin(), (p[:, None] * freqs).cos()], dim=1) for p in (col, row)]
    return torch.cat(embed, dim=1)


class DiT(nn.Module):
    """Diffusion Transformer with IMM's second time embedding (the authors' ImageNet backbone, module docstring):
    patchify -> + fixed positions -> adaLN-Zero blocks -> adaLN final layer -> unpatchify. The conditioning is
    emb = MLP_t(c_noise_t) + MLP_s(c_noise_s) + the label's row of a table with a last row for the null class."""

    def __init__(self, img_resolution=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, dropout=0.0):
        super().__init__()
        if img_resolution % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f'DiT: img_resolution {img_resolution} must be a multiple of patch_size {patch_size}, '
                             f'and hidden_size {hidden_size} a multiple of 4 and of num_heads {num_heads}')
        self.config = dict(arch='dit', img_resolution=img_resolution, in_channels=in_channels, patch_size=patch_size,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, dropout=dropout)
        self.num_classes, self.patch_size, self.in_channels = num_classes, patch_size, in_channels
        self.grad_checkpoint = False  # a run-time switch (train.py --grad-checkpoint), not part of the config
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer('pos_embed', _sincos_positions(hidden_size, img_resolution // patch_size)[None].float())
        self.embed_t = DiTTimeEmbedding(hidden_size)
        self.embed_s = DiTTimeEmbedding(hidden_size)
        self.embed_label = nn.Embedding(num_classes + 1, hidden_size)           # row num_classes: the null class
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)  # per patch: (p, q, channel)
        self.init_as_dit()

    @torch.no_grad()
    def init_as_dit(self):
        """DiT's initialisation, as in the authors' code: xavier-uniform linear weights (the patch embedding as a
        linear map of the flattened patch) and zero biases; label table and time MLPs N(0, 0.02^2); every
        modulation and the output layer zero (adaLN-Zero), so the network's output starts exactly at zero."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.embed_label.weight, std=0.02)
        for embed in (self.embed_t, self.embed_s):
            nn.init.normal_(embed.mlp[0].weight, std=0.02)
            nn.init.normal_(embed.mlp[2].weight, std=0.02)
        for layer in [*(blk.modulation for blk in self.blocks), self.out_modulation, self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c_noise_t, c_noise_s, labels=None, augment_labels=None):
        if augment_labels is not None:
            raise ValueError('augment_labels were given to a DiT, which has no augmentation input '
                             '(the ImageNet setting uses none); train it with --augment 0')
        if labels is None:  # unconditional use = the null class (the only row when num_classes = 0)
            labels = torch.full(c_noise_t.shape, self.num_classes, dtype=torch.long, device=x.device)
        elif not self.num_classes:
            raise ValueError('labels were given to an unconditional DiT (num_classes=0); '
                             'build it with num_classes > 0 for class-conditional use')
        emb = self.embed_t(c_noise_t) + self.embed_s(c_noise_s) + self.embed_label(labels)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed          # [B, patches, hidden]
        for block in self.blocks:
            h = _run_block(block, h, emb, self.grad_checkpoint)
        shift, scale = self.out_modulation(F.silu(emb)).chunk(2, dim=1)
        h = self.out(_modulate(self.out_norm(h), shift, scale))
        return self.unpatchify(h)

    def unpatchify(self, h):
        """[B, patches, p * p * C] -> [B, C, H, W]."""
        B, g, p, C = h.shape[0], int(h.shape[1] ** 0.5), self.patch_size, self.in_channels
        return h.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)
