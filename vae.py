"""
The Stable Diffusion VAE between images and latents, for the paper's ImageNet-256 model (App. I; docs/method.md,
section 6): the IMM network is trained on VAE latents, so images are encoded once, here, into the latent .npz that train.py
reads (data.py, kind 'latent'), and sample.py decodes the sampled latents back to images with decode_latents.

    python vae.py data/imagenet/train --out data/imagenet-latents.npz      # ImageNet's train layout: 1.28M images
    python vae.py path/to/folder --out latents.npz --vae path/to/vae      # a VAE folder written by save_pretrained

The VAE is diffusers' AutoencoderKL, an optional dependency (pip install diffusers) imported only here. --vae takes
a Hugging Face name (the release uses stabilityai/sd-vae-ft-ema; downloaded once into the Hugging Face cache) or a
local folder. Each image is centre-cropped and resized to --resolution as ADM's center_crop_arr does (halve with a
box filter while the short side is at least twice the target, bicubic resize of the short side, centre crop), with
no flips, and encoded to the mean of the VAE's posterior. The .npz holds
    x            float16 [N, 4, R/8, R/8]  raw latents (the release also runs its VAE in fp16)
    labels       int64 [N]                 the sub-folder's index among the sorted sub-folders (ImageNet: class id)
    classes      str [K]                   the sub-folder names, in label order
    latent_mean, latent_std  float32 [4]   what data.py normalises the channels by: the release's ImageNet values
                                           for sd-vae-ft-ema (App. I), whatever --vae is
    vae          str                       --vae, which sample.py decodes with
The release (after EDM2) stores the posterior's mean and std and draws a latent each time an image is used; we keep
its mean, so the data is one fixed array. Written atomically: an interrupted run leaves no file.
"""
import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from authors import DEFAULT_VAE, IMAGENET_LATENT_MEAN, IMAGENET_LATENT_STD
from data import ImageFiles, encode, image_files, to_uint8
from util import UsageError, exit_on_usage_error, write_atomically


def load_vae(name, device):
    """diffusers' AutoencoderKL from a Hugging Face name or a local folder, in eval mode on device."""
    try:
        import diffusers
    except ImportError:
        raise UsageError('the Stable Diffusion VAE needs the diffusers library: pip install diffusers') from None
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(name)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--vae {name}: cannot load an AutoencoderKL ({type(e).__name__}: {reason}); pass a "
                         f"Hugging Face name such as {DEFAULT_VAE} (downloaded once) or a folder written by "
                         f"save_pretrained") from None
    return vae.eval().requires_grad_(False).to(device)


@torch.no_grad()
def encode_images(vae, images):
    """uint8 images [B, 3, H, W] -> raw latents float32 [B, C, H/8, W/8]: the mean of the VAE's posterior."""
    device = next(vae.parameters()).device
    return vae.encode(encode(images.to(device))).latent_dist.mean.float()


@torch.no_grad()
def decode_latents(vae, latents, batch=32):
    """Raw latents float [N, C, h, w] (data.decode undoes the normalisation) -> uint8 images [N, H, W, 3], numpy."""
    device = next(vae.parameters()).device
    latents = torch.as_tensor(latents, dtype=torch.float32)
    return np.concatenate([to_uint8(vae.decode(z.to(device)).sample).permute(0, 2, 3, 1).cpu().numpy()
                           for z in latents.split(batch)])


def center_crop(image, size):
    """A PIL image -> uint8 [size, size, 3], as ADM's center_crop_arr (the ImageNet preprocessing of ADM, DiT,
    EDM2 and the release): box-filter halvings while the short side is >= 2 size, bicubic resize of the short side
    to size, centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(v // 2 for v in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(v * scale) for v in image.size), resample=Image.BICUBIC)
    array = np.asarray(image.convert('RGB'))
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def encode_folder(args):
    """The image folder -> the latent .npz described in the module docstring, with a progress line every 10 s."""
    paths, labels, classes = image_files(args.folder)
    device = torch.device(args.device)
    vae = load_vae(args.vae, device)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, args.resolution, center_crop), batch_size=args.batch,
                                         num_workers=args.workers)
    print(f"{args.folder}: {len(paths)} images, {len(classes) if classes else 'no'} classes -> {args.vae} on {device}",
          flush=True)
    x, done, start, last = None, 0, time.time(), time.time()
    for images, errors in loader:
        if any(errors):
            raise UsageError(next(e for e in errors if e))
        latents = encode_images(vae, images).cpu().numpy()
        if x is None:  # the latent shape is known after the first batch
            x = np.empty((len(paths), *latents.shape[1:]), np.float16)
        x[done:done + len(latents)] = latents
        done += len(latents)
        if time.time() - last > 10 or done == len(paths):
            last, rate = time.time(), done / (time.time() - start)
            print(f"{done}/{len(paths)} images, {rate:.1f} img/s, ETA {(len(paths) - done) / rate / 60:.1f} min",
                  flush=True)
    arrays = dict(x=x, latent_mean=np.float32(IMAGENET_LATENT_MEAN), latent_std=np.float32(IMAGENET_LATENT_STD),
                  vae=np.str_(args.vae))
    if labels is not None:
        arrays.update(labels=labels, classes=np.array(classes))
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    write_atomically(args.out, lambda tmp: np.savez(tmp, **arrays))
    print(f"wrote {args.out}: x {x.dtype} {list(x.shape)}" + (f", labels of {len(classes)} classes" if classes else ''))


def main(argv=None):
    p = argparse.ArgumentParser(description='Encode an image folder into Stable Diffusion VAE latents (see the '
                                            'module docstring).')
    add = p.add_argument
    add('folder', help="images, searched recursively; one sub-folder per class (ImageNet's train layout) gives labels")
    add('--out', required=True, help='the .npz to write (train.py --dataset reads it)')
    add('--vae', default=DEFAULT_VAE, help=f'a diffusers AutoencoderKL: Hugging Face name or local folder '
                                           f'(default: {DEFAULT_VAE}, the release\'s)')
    add('--resolution', type=int, default=256, help='side of the centre-cropped images (the paper: 256)')
    add('--batch', type=int, default=64, help='images per VAE forward')
    add('--workers', type=int, default=min(8, os.cpu_count() or 1), help='processes that decode the images')
    add('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='where the VAE runs')
    args = p.parse_args(argv)
    with exit_on_usage_error():
        if not args.out.endswith('.npz'):
            raise UsageError(f'--out {args.out}: must end in .npz')
        if args.resolution < 8 or args.resolution % 8 or args.batch < 1:
            raise UsageError(f'--resolution {args.resolution} must be a multiple of 8 (the VAE downsamples by 8) and '
                             f'--batch {args.batch} at least 1')
        if not os.path.isdir(args.folder):
            raise UsageError(f'{args.folder}: no such folder of images')
        encode_folder(args)


if __name__ == '__main__':
    main()
