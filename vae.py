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
no flips, and encoded to the VAE's posterior, a normal distribution per latent value. As the release (after EDM2)
does, the file keeps the posterior's mean and std, and train.py draws a fresh latent mean + std * n each time an
image is used (--no-latent-draw: the mean). The .npz holds
    x              float16 [N, 4, R/8, R/8]  the posterior means: raw latents (the release also runs its VAE in fp16)
    posterior_std  float16 [N, 4, R/8, R/8]  the posterior's stds (with x: 21.0 GB for ImageNet, x alone 10.5 GB)
    labels         int64 [N]                 the sub-folder's index among the sorted sub-folders (ImageNet: class id)
    classes        str [K]                   the sub-folder names, in label order
    latent_mean, latent_std  float64 [C]     what data.py normalises the channels by: the per-channel mean and std
                                             over the whole set of the latents training draws (data.latent_statistics);
                                             for sd-vae-ft-ema the release's ImageNet values (App. I), ours
                                             printed beside them (RELEASE_AGREEMENT: when they disagree)
    vae            str                       --vae, which sample.py decodes with
It is an uncompressed .npz (np.savez), so train.py memory-maps x and posterior_std instead of reading them. The two
arrays are filled on disk, memory-mapped in a temporary folder beside --out, so encoding needs little memory but
free disk space for twice the file; the .npz is written atomically: an interrupted run leaves no file.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from authors import DEFAULT_VAE, IMAGENET_LATENT_MEAN, IMAGENET_LATENT_STD
from data import ImageFiles, encode, image_files, latent_statistics, to_uint8
from util import Progress, UsageError, exit_on_usage_error, write_atomically


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


# sd-vae-ft-ema gets the release's statistics as they are, so that a model trained here is normalised as the
# release's models are; ours are computed beside them as a check. The release normalises the latents it draws, so
# its values stand for the draws' statistics, which latent_statistics computes (its code does not say whether they
# were measured on draws or on posterior means; the two differ by the mean posterior variance). A difference is read
# in units of the channel's std, what the normalisation divides by: 1% moves the normalised data's mean by 0.01 of
# its std, or scales its std by 1.01. The same images encoded as the release encodes them differ only by the VAE's
# precision (fp16 there, fp32 here) and the fp16 storage, roundings per value that average out over 1.28M x 32 x 32
# values per channel to far less than 1%; more than 1% means other data (a subset, another resolution or crop) or
# another VAE under that name.
RELEASE_AGREEMENT = 0.01


@torch.no_grad()
def encode_images(vae, images):
    """uint8 images [B, 3, H, W] -> the VAE's posterior, (mean, std) float32 [B, C, H/8, W/8] each."""
    device = next(vae.parameters()).device
    posterior = vae.encode(encode(images.to(device))).latent_dist
    return posterior.mean.float(), posterior.std.float()


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
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(args.out) or '.', prefix='.vae-') as scratch:
        posterior, done, progress = None, 0, Progress('encode', len(paths), 'images')
        for images, errors in loader:
            if any(errors):
                raise UsageError(next(e for e in errors if e))
            mean, std = (v.cpu().numpy() for v in encode_images(vae, images))
            if posterior is None:  # the latent shape is known after the first batch; the arrays live on disk
                posterior = [np.lib.format.open_memmap(os.path.join(scratch, f'{key}.npy'), 'w+', np.float16,
                                                       (len(paths), *mean.shape[1:])) for key in ('mean', 'std')]
            posterior[0][done:done + len(mean)], posterior[1][done:done + len(std)] = mean, std
            done += len(mean)
            progress.add(len(mean))
        for array in posterior:
            array.flush()
        arrays = dict(x=posterior[0], posterior_std=posterior[1], vae=np.str_(args.vae),
                      **normalisation(args.vae, *posterior))
        if labels is not None:
            arrays.update(labels=labels, classes=np.array(classes))
        write_atomically(args.out, lambda tmp: np.savez(tmp, **arrays))   # streams the maps into the zip
        del arrays, posterior                                             # unmapped before the folder goes
    print(f"wrote {args.out}: x and posterior_std float16 {[len(paths), *mean.shape[1:]]}"
          + (f", labels of {len(classes)} classes" if classes else ''))


def normalisation(vae_name, posterior_mean, posterior_std):
    """{latent_mean, latent_std} to write: the statistics of the latent draws over the whole set (float64 per
    channel), or for sd-vae-ft-ema the release's, printed beside ours with a warning naming the largest difference
    when it is more than RELEASE_AGREEMENT of the channel's std."""
    mean, std = latent_statistics(posterior_mean, posterior_std)
    print(f"statistics of the latent draws over {len(posterior_mean)} images, per channel: "
          f"mean {np.round(mean, 5).tolist()}, std {np.round(std, 5).tolist()}")
    if vae_name != DEFAULT_VAE:
        return dict(latent_mean=mean, latent_std=std)
    release_mean, release_std = np.array(IMAGENET_LATENT_MEAN), np.array(IMAGENET_LATENT_STD)
    print(f"the release's for {DEFAULT_VAE}, written: mean {release_mean.tolist()}, std {release_std.tolist()}")
    differences = {f'{what} of channel {c}': abs(ours[c] - release[c]) / release_std[c]
                   for what, ours, release in (('mean', mean, release_mean), ('std', std, release_std))
                   for c in range(len(release))}
    worst = max(differences, key=differences.get)
    if differences[worst] > RELEASE_AGREEMENT:
        print(f"warning: these latents' statistics differ from the release's by up to {differences[worst]:.1%} of a "
              f"channel's std ({worst}; under {RELEASE_AGREEMENT:.0%} expected for ImageNet's train set at 256 px); "
              f"the release's are written all the same, so that models trained on them match the release's",
              file=sys.stderr)
    return dict(latent_mean=release_mean, latent_std=release_std)


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
