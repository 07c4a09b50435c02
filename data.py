"""
Training data for IMM: every dataset ends up as one tensor in memory, except latents, which stay in their file
(memory-mapped) and are read a batch at a time; decoding back to data, and pictures.

    from data import load_dataset
    data = load_dataset('cifar10', data_dir='data')   # data.x: uint8 [50000, 3, 32, 32], data.labels: int64 [50000]
    data = load_dataset('moons')                       # data.x: float32 [N, 2], standardised to sigma_d = 0.5

What `name` can be:
- 'cifar10': the 50k training images. Read from <data_dir>/cifar-10-batches-py (the python-pickle batches);
  downloaded there with torchvision only when that folder is missing.
- a folder of images (searched recursively), centre-cropped and resized to `resolution`. Images inside
  sub-folders get the sub-folder's name as their class, as torchvision's ImageFolder does.
- a .npy / .npz file: uint8 images [N, H, W, C], [N, C, H, W] or [N, H, W], float vectors [N, D], or float
  latents [N, C, H, W]. A .npz holds one array, or the data under 'x' and optional int labels under 'labels'.
- latents (kind 'latent'): any float [N, C, H, W] array, e.g. the .npz that `python vae.py IMAGE_FOLDER --out F.npz`
  writes (Stable Diffusion VAE latents of ImageNet, the paper's ImageNet-256 data, App. I). Such a file holds
  x (the raw latents: the mean of the VAE's posterior), posterior_std (the posterior's std, same shape), labels,
  latent_mean and latent_std (float [C]: the per-channel statistics to normalise by; vae.py writes the release's
  ImageNet values for sd-vae-ft-ema, its own statistics of the data otherwise) and vae (the VAE's name, which
  sample.py decodes with). Without latent_mean/latent_std, each channel is normalised by the file's own
  statistics (latent_statistics). data.x is then a Latents (below), not a tensor.
- 'digits': the 1,797 8x8 handwritten digits that scikit-learn ships (no download; scikit-learn is an optional
  dependency), grey levels 0..16 scaled to uint8 0..255, 1 channel, labels 0..9.
- 'mnist': the 60k 28x28 MNIST training digits, read from <data_dir>/MNIST/raw (the idx files); downloaded
  there with torchvision only when they are missing.
- a built-in 2-D toy generated in code: 'checkerboard', 'moons', 'spirals', 'gaussians8' (with labels).

Images stay uint8 here; encode() maps a batch to [-1, 1] when train.py draws it. Vectors are standardised per
dimension to std sigma_d, the data scale the IMM schedules assume (docs/method.md, section 1);
`mean` and `std` undo it. Latents are normalised per channel the same way, x = (raw - mean) / std * sigma_d
(normalise_latents; denormalise_latents undoes it), per batch as train.py draws it: a Latents keeps the raw
arrays memory-mapped from an uncompressed .npy / .npz (ImageNet's posterior means and stds in float16: 21 GB), or
whole on the GPU when they fit, and gathers each batch's rows (Latents.batch).
decode() maps the network's outputs back (to uint8 images, vector units, raw latents); save_image_grid,
save_scatter and save_side_by_side write the pictures that train.py and sample.py show. EDM's augmentation of
image batches is augment.py.
"""

import itertools
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from util import UsageError

SIGMA_D = 0.5                          # data std the method assumes (docs/method.md, section 1)
TOYS = ('checkerboard', 'moons', 'spirals', 'gaussians8')
TOY_SIZE = 100_000                     # points drawn for a toy (a fixed set, like a real dataset)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff')
ACCEPTED = "'cifar10', 'digits', 'mnist', a folder of images, a .npy/.npz file, or a toy: " + ', '.join(TOYS)


@dataclass
class Dataset:
    name: str
    kind: str                          # 'image', 'vector' or 'latent'
    x: 'torch.Tensor | Latents'        # uint8 [N, C, H, W] images, float32 [N, D] standardised vectors,
                                       # or Latents: raw latents [N, C, H, W], mapped from their file
    labels: torch.Tensor | None        # int64 [N] in [0, num_classes), or None
    num_classes: int                   # 0 when there are no labels
    mean: torch.Tensor | None = None   # float32 [D] (vectors) or [C] (latents): x_raw = x / sigma_d * std + mean
    std: torch.Tensor | None = None
    vae: str | None = None             # latents: the VAE that encoded them (a diffusers name or folder), if known


def load_dataset(name, data_dir='data', resolution=None, workers=0):
    """The dataset called `name` (see the module docstring); `workers` processes decode image folders."""
    name = str(name)
    if name in TOYS:
        points, labels = make_toy(name, TOY_SIZE)
        return _vectors(name, points, labels)
    if name == 'cifar10':
        images, labels = _read_cifar10(data_dir)
        return _images(name, _fit_array(images, resolution), labels)
    if name in ('digits', 'mnist'):
        images, labels = _read_digits() if name == 'digits' else _read_mnist(data_dir)
        return _images(name, _fit_array(images, resolution), labels)
    if os.path.isdir(name):
        images, labels = _read_folder(name, resolution, workers)
        return _images(name, images, labels)
    if name.endswith(('.npy', '.npz')):
        if not os.path.isfile(name):
            raise UsageError(f"dataset file {name!r} does not exist")
        return _read_array(name, resolution)
    if os.path.exists(name):
        raise UsageError(f"dataset {name!r} is neither a folder nor a .npy/.npz file; accepted: {ACCEPTED}")
    raise UsageError(f"unknown dataset {name!r} (no such file or folder); accepted: {ACCEPTED}")


def _images(name, images, labels):
    images = torch.from_numpy(np.ascontiguousarray(images))
    if labels is None:
        return Dataset(name, 'image', images, None, 0)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return Dataset(name, 'image', images, labels, int(labels.max()) + 1)


def _vectors(name, points, labels=None):
    """Standardise each dimension to mean 0 and std sigma_d."""
    points = points.astype(np.float64)
    mean, std = points.mean(0), points.std(0)
    std[std == 0] = 1.0                # a constant dimension stays constant (0) instead of dividing by 0
    x = (points - mean) / std * SIGMA_D
    num_classes = 0
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        num_classes = int(labels.max()) + 1
    return Dataset(name, 'vector', torch.from_numpy(x).float(), labels, num_classes,
                   torch.from_numpy(mean).float(), torch.from_numpy(std).float())


# ----------------------------------------------------------------------------------------------------
# 2-D toys: (points float64 [n, 2], labels int64 [n]), the same every time.

def make_toy(name, n, seed=0):
    rng = np.random.default_rng(seed)
    if name == 'checkerboard':         # 8 filled squares of a 4 x 4 board on [-2, 2]^2; label = square
        cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
        labels = rng.integers(0, len(cells), n)
        points = cells[labels] + rng.random((n, 2)) - 2.0
    elif name == 'moons':              # two interleaved half circles; label = moon
        labels = rng.integers(0, 2, n)
        angle = rng.random(n) * np.pi
        points = np.stack([np.cos(angle), np.sin(angle)], 1)
        points[labels == 1] = np.array([1.0, 0.5]) - points[labels == 1]
        points += 0.05 * rng.standard_normal((n, 2))
    elif name == 'spirals':            # two arms winding 1.5 turns out from the centre; label = arm
        labels = rng.integers(0, 2, n)
        r = np.sqrt(rng.random(n))     # uniform density along the area, not along the arm
        angle = 3 * np.pi * r + np.pi * labels
        points = 2 * r[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        points += 0.05 * rng.standard_normal((n, 2))
    elif name == 'gaussians8':         # 8 small Gaussians on a circle of radius 2; label = Gaussian
        labels = rng.integers(0, 8, n)
        angle = labels * np.pi / 4
        points = 2 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.1 * rng.standard_normal((n, 2))
    else:
        raise UsageError(f"unknown toy {name!r}; accepted: {', '.join(TOYS)}")
    return points, labels


# ----------------------------------------------------------------------------------------------------
# Images: uint8 numpy [N, C, H, W] from CIFAR-10, a folder, or an array.

def _read_cifar10(data_dir):
    folder = os.path.join(data_dir, 'cifar-10-batches-py')
    if not os.path.isdir(folder):
        try:
            import torchvision         # only needed for the download
        except ImportError:
            raise UsageError(f"CIFAR-10 is not in {folder!r} and torchvision, which downloads it, is not "
                             f"installed: pip install torchvision, or put the python batches there") from None
        print(f"downloading CIFAR-10 into {data_dir!r}")
        try:
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:
            raise UsageError(f"could not download CIFAR-10 into {data_dir!r}: {e}") from None
    images, labels = [], []
    for i in range(1, 6):
        path = os.path.join(folder, f'data_batch_{i}')
        try:
            with open(path, 'rb') as f:
                batch = pickle.load(f, encoding='bytes')
            data = np.asarray(batch[b'data'])
            batch_labels = np.asarray(batch[b'labels'], dtype=np.int64)
        except Exception as e:
            raise UsageError(f"cannot read CIFAR-10 batch {path!r} ({type(e).__name__}: {e}); "
                             f"delete {folder!r} to download it again") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
            raise UsageError(f"CIFAR-10 batch {path!r} holds {data.dtype} {list(data.shape)} with "
                             f"{len(batch_labels)} labels; expected uint8 [N, 3072] with N labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _read_digits():
    """scikit-learn's 1,797 8x8 digits (its copy of the UCI test set): grey levels 0..16 -> uint8 0..255."""
    try:
        from sklearn.datasets import load_digits   # ships the data inside the package: no download
    except ImportError:
        raise UsageError("dataset 'digits' comes with scikit-learn, which is not installed: "
                         "pip install scikit-learn") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]   # [1797, 1, 8, 8]
    return images, digits.target.astype(np.int64)


def _read_mnist(data_dir):
    """The 60k MNIST training digits, uint8 [N, 1, 28, 28], from the idx files under <data_dir>/MNIST/raw.
    torchvision reads them, and downloads them first only when one of the four files is missing."""
    try:
        import torchvision
    except ImportError:
        raise UsageError("dataset 'mnist' is read (and downloaded) by torchvision, which is not installed: "
                         "pip install torchvision") from None
    raw = os.path.join(data_dir, 'MNIST', 'raw')
    try:
        mnist = torchvision.datasets.MNIST(data_dir, train=True, download=False)
    except RuntimeError:                          # not there yet: fetch it
        print(f"downloading MNIST into {raw!r}")
        try:
            mnist = torchvision.datasets.MNIST(data_dir, train=True, download=True)
        except Exception as e:
            raise UsageError(f"could not download MNIST into {raw!r}: {e}") from None
    except Exception as e:
        raise UsageError(f"cannot read MNIST from {raw!r} ({type(e).__name__}: {e}); "
                         f"delete that folder to download it again") from None
    return mnist.data.numpy()[:, None], mnist.targets.numpy().astype(np.int64)


def _fit(image, resolution):
    """Centre-crop a PIL image to a square and resize it to resolution x resolution."""
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def _fit_array(images, resolution):
    """uint8 [N, C, H, W] centre-cropped and resized to `resolution` (unchanged when it already fits)."""
    n, c, h, w = images.shape
    if resolution is None:
        if h != w:
            raise UsageError(f"images are {h}x{w}, not square; pass --resolution to crop and resize them")
        return images
    if resolution < 1:
        raise UsageError(f"--resolution {resolution} must be a positive number of pixels")
    if h == w == resolution:
        return images
    out = np.empty((n, c, resolution, resolution), np.uint8)
    for i, image in enumerate(images):
        hwc = image.transpose(1, 2, 0)
        pil = Image.fromarray(hwc[:, :, 0] if c == 1 else hwc)
        out[i] = np.asarray(_fit(pil, resolution)).reshape(resolution, resolution, c).transpose(2, 0, 1)
    return out


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one image file into (uint8 [3, R, R], error message or ''); a DataLoader runs it in workers.
    fit(rgb PIL image, R) crops and resizes it (to a PIL image or an array [R, R, 3]): _fit here, ADM's centre
    crop in vae.py."""

    def __init__(self, paths, resolution, fit=None):
        self.paths, self.resolution, self.fit = paths, resolution, fit or _fit

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as image:
                image = self.fit(image.convert('RGB'), self.resolution)
        except Exception as e:         # reported by the main process: a worker's exception carries a traceback
            return torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), \
                f"cannot read image {self.paths[i]!r} ({type(e).__name__}: {e})"
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), ''


def image_files(folder):
    """(sorted image paths under folder, int labels or None, class names or None). ImageFolder layout:
    <folder>/<class name>/<image> labels each image by its sub-folder, classes in sorted order (ImageNet's train
    layout gives the usual class indices); images directly in folder, or a single sub-folder, mean no labels."""
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder, followlinks=True)
                   for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UsageError(f"folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    parents = [os.path.relpath(os.path.dirname(p), folder).split(os.sep)[0] for p in paths]
    if '.' in parents or len(set(parents)) < 2:
        return paths, None, None
    classes = sorted(set(parents))
    index = {c: i for i, c in enumerate(classes)}
    return paths, np.array([index[p] for p in parents], dtype=np.int64), classes


def _read_folder(folder, resolution, workers):
    paths, labels, _ = image_files(folder)
    if resolution is None:
        with Image.open(paths[0]) as first:
            if first.size[0] != first.size[1]:
                raise UsageError(f"{paths[0]!r} is {first.size[0]}x{first.size[1]}, not square; "
                                 f"pass --resolution to crop and resize the images")
            resolution = first.size[0]
    if resolution < 1:
        raise UsageError(f"--resolution {resolution} must be a positive number of pixels")
    loader = torch.utils.data.DataLoader(ImageFiles(paths, resolution), batch_size=256, num_workers=workers)
    images = []
    for batch, errors in loader:
        if any(errors):
            raise UsageError(next(e for e in errors if e))
        images.append(batch.numpy())
    return np.concatenate(images), labels


def _read_array(path, resolution):
    what = ("uint8 images [N, H, W, C], [N, C, H, W] or [N, H, W] (C = 1 or 3), "
            "float vectors [N, D], or float latents [N, C, H, W] with H = W")
    try:
        loaded = np.load(path, mmap_mode='r', allow_pickle=False)   # a .npy is mapped; an .npz's members below
    except Exception as e:
        raise UsageError(f"cannot read {path!r} as a numpy file ({type(e).__name__}: {e})") from None
    labels, latent = None, {}
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if len(keys) == 1:
                array = npz_member(path, loaded, keys[0])
            elif 'x' in keys:
                array = npz_member(path, loaded, 'x')
                labels = loaded['labels'] if 'labels' in keys else None
                latent = {k: loaded[k] for k in LATENT_KEYS if k in keys}
                if 'posterior_std' in keys:
                    latent['posterior_std'] = npz_member(path, loaded, 'posterior_std')
            else:
                raise UsageError(f"{path!r} holds arrays {keys}; expected one array, or 'x' (and optional 'labels')")
    else:
        array = loaded
    if array.size == 0:
        raise UsageError(f"{path!r} holds an empty array {list(array.shape)}; expected {what}")
    if labels is not None:
        if labels.shape != (len(array),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise UsageError(f"labels in {path!r} are {labels.dtype} {list(labels.shape)}; "
                             f"expected non-negative integers [{len(array)}]")
    name = path
    is_latent = np.issubdtype(array.dtype, np.floating) and array.ndim == 4 and array.shape[2] == array.shape[3]
    if latent and not is_latent:
        raise UsageError(f"{path!r} holds {', '.join(latent)}, keys of latents, but x is {array.dtype} "
                         f"{list(array.shape)}; expected float latents [N, C, H, W] with H = W")
    if is_latent:
        return _latents(path, array, labels, **latent)
    if isinstance(array, np.memmap):
        array = np.array(array)                                      # images and vectors are read into memory
    if array.dtype == np.uint8 and array.ndim in (3, 4):
        if array.ndim == 3:
            images = array[:, None]                                  # [N, H, W] grey
        elif array.shape[3] in (1, 3):
            images = array.transpose(0, 3, 1, 2)                     # [N, H, W, C]
        elif array.shape[1] in (1, 3):
            images = array                                           # [N, C, H, W]
        else:
            raise UsageError(f"{path!r} holds uint8 {list(array.shape)}: no axis of 1 or 3 channels; expected {what}")
        return _images(name, _fit_array(images, resolution), labels)
    if np.issubdtype(array.dtype, np.floating) and array.ndim == 2:
        if not np.isfinite(array).all():
            raise UsageError(f"{path!r} holds NaN or infinite values; expected finite float vectors [N, D]")
        return _vectors(name, array, labels)
    raise UsageError(f"{path!r} holds {array.dtype} {list(array.shape)}; expected {what}")


# ----------------------------------------------------------------------------------------------------
# Latents: float [N, C, H, W] from a VAE (vae.py), normalised per channel to std sigma_d (App. I: the ImageNet
# latents' channels are normalised by fixed means and stds, then multiplied by 0.5 = sigma_d). They stay in their
# file, memory-mapped, and each training step reads its rows: ImageNet's posterior means and stds are 21 GB, which
# the 8 ranks of a node could not each hold in memory.

LATENT_KEYS = ('latent_mean', 'latent_std', 'vae')   # the small arrays a latent .npz may hold beside x and labels
DEVICE_SHARE = 0.2    # latents go to a GPU whole when they take at most this share of its memory (see fits_on_device)


def normalise_latents(raw, mean, std):
    """Raw latents [N, C, H, W] -> the network's data: (raw - mean) / std * sigma_d, mean and std per channel."""
    return (raw - mean[:, None, None]) / std[:, None, None] * SIGMA_D


def denormalise_latents(x, mean, std):
    """The inverse of normalise_latents: x / sigma_d * std + mean, per channel."""
    return x / SIGMA_D * std[:, None, None] + mean[:, None, None]


def latent_statistics(posterior_mean, posterior_std=None):
    """Per-channel mean and std (float64 [C]) over the whole set of the latents training draws, mean + std * n with
    n ~ N(0, I), in closed form: their mean is that of the posterior means, their variance the posterior means'
    variance plus the mean of std^2. Without posterior_std, those of the array itself. Accumulated in float64."""
    c = posterior_mean.shape[1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    stds = _chunks(posterior_std) if posterior_std is not None else itertools.repeat(None)
    for means, std in zip(_chunks(posterior_mean), stds):
        means = means.astype(np.float64)
        total += means.sum((0, 2, 3))
        total_sq += (means ** 2).sum((0, 2, 3)) + (0 if std is None else (std.astype(np.float64) ** 2).sum((0, 2, 3)))
        count += means.size // c
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))


def fits_on_device(nbytes, device):
    """Whether latents of nbytes go to the device whole: a GPU, and at most DEVICE_SHARE of its memory, so that the
    rest is left to the network, its optimizer state and the activations (DiT-XL/2's weights, gradients, EMA and
    AdamW state alone take 13.5 GB). On a CPU they stay mapped: a copy in memory is what mapping saves."""
    return device.type == 'cuda' and nbytes <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory


class Latents:
    """Dataset.x of latents: the raw posterior means [N, C, H, W] and, when the file holds them, the posterior's stds,
    with the per-channel statistics that normalise them. Loaded, the arrays are memory-mapped from the file (numpy
    arrays, in memory only for a compressed .npz); placed() puts them where a device's steps read them, and batch()
    gives a step's rows, drawn and normalised, on that device. shape, dtype, ndim and len() describe those rows, so
    code that reads Dataset.x's shape (settings, checkpoint.data_info) reads a Latents as it reads an image tensor."""

    def __init__(self, posterior_mean, posterior_std, mean, std, device='cpu'):
        self.posterior_mean, self.posterior_std = posterior_mean, posterior_std
        self.mean, self.std = mean, std                    # float32 [C], on device
        self.device = torch.device(device)
        self.shape, self.dtype, self.ndim = torch.Size(posterior_mean.shape), torch.float32, posterior_mean.ndim

    def __len__(self):
        return self.shape[0]

    @property
    def on_host(self):
        return isinstance(self.posterior_mean, np.ndarray)

    def nbytes(self, draw=True):
        """Bytes of the arrays a run reads: the posterior means, and their stds when it draws."""
        return sum(a.nbytes for a in (self.posterior_mean, self.posterior_std if draw else None) if a is not None)

    def placed(self, device, whole, draw=True):
        """These latents for training on device: the arrays copied there whole (chunk by chunk), or left mapped for
        batch() to gather on the host. Without draw, the stds are dropped and every use is the posterior mean."""
        arrays = [self.posterior_mean, self.posterior_std if draw else None]
        if whole:
            arrays = [None if a is None else _whole_on(a, device) for a in arrays]
        return Latents(*arrays, self.mean.to(device), self.std.to(device), device)

    def batch(self, rows, noise=None):
        """The normalised latents float32 [B, C, H, W] of these rows on the device: mean + std * noise with noise
        (one fresh latent per use), else the posterior means. rows live on the CPU when on_host."""
        raw = self._gather(self.posterior_mean, rows)
        if noise is not None:
            raw = raw + self._gather(self.posterior_std, rows) * noise
        return normalise_latents(raw, self.mean, self.std)

    def _gather(self, array, rows):
        """float32 rows of array on the device: indexed there, or read from the map into pinned memory and copied
        without blocking (the pinned block is not reused before its copy is done)."""
        if not self.on_host:
            return array[rows].float()
        gathered = torch.from_numpy(array[rows.numpy()])
        if self.device.type == 'cuda':
            gathered = gathered.pin_memory().to(self.device, non_blocking=True)
        return gathered.float()


def _whole_on(array, device):
    """A numpy array (or map) as one tensor on device, of its dtype, copied over chunk by chunk."""
    whole = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, device=device)
    done = 0
    for chunk in _chunks(array):
        whole[done:done + len(chunk)] = torch.from_numpy(chunk)
        done += len(chunk)
    return whole


def _chunks(array, values=1 << 22):
    """array [N, ...] in chunks of whole rows, about `values` values each, read into memory. A map is read with plain
    file reads: a pass over it then leaves none of its pages counted in this process's memory (RSS); they stay in the
    page cache, which the ranks of a node share and the kernel can drop."""
    row = int(np.prod(array.shape[1:]))
    rows = max(1, values // max(row, 1))
    if not isinstance(array, np.memmap):
        yield from (array[i:i + rows] for i in range(0, len(array), rows))
        return
    with open(array.filename, 'rb') as f:
        f.seek(array.offset)
        for i in range(0, len(array), rows):
            n = min(rows, len(array) - i)
            yield np.fromfile(f, array.dtype, n * row).reshape(n, *array.shape[1:])


def npz_member(path, npz, key):
    """The array `key` of an .npz: memory-mapped read-only where it can be (_map_npz_member), else read."""
    mapped = _map_npz_member(path, key)
    return npz[key] if mapped is None else mapped


def _map_npz_member(path, key):
    """The .npz member `key` as a read-only np.memmap, or None where it cannot be mapped: a compressed member
    (np.savez_compressed), a Fortran-ordered or empty one. np.savez stores members uncompressed, so each .npy lies
    in the zip file as it is: the member's local header (30 bytes, then its name and extra field, whose lengths
    are at bytes 26 and 28), the .npy header, then the data."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(key + '.npy')
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b'PK\x03\x04':
            return None
        f.seek(info.header_offset + 30 + sum(struct.unpack('<HH', local[26:30])))
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
        if read_header is None:
            return None
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if fortran_order or dtype.hasobject or not np.prod(shape):
        return None
    return np.memmap(path, dtype, 'r', offset, shape)


def _latents(name, array, labels=None, posterior_std=None, latent_mean=None, latent_std=None, vae=None):
    """Latents as they are in the file (mapped), normalised by its latent_mean / latent_std or else by the
    statistics of their own draws (latent_statistics). One pass of plain reads checks that they are finite."""
    n, c = array.shape[:2]
    if isinstance(array, np.memmap) and not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)                # a Fortran-ordered .npy: read into memory
    if posterior_std is not None and (posterior_std.shape != array.shape
                                      or not np.issubdtype(posterior_std.dtype, np.floating)):
        raise UsageError(f"{name!r}: posterior_std is {posterior_std.dtype} {list(posterior_std.shape)}; expected "
                         f"float {list(array.shape)}, the shape of x")
    if (latent_mean is None) != (latent_std is None):
        raise UsageError(f"{name!r} holds only one of latent_mean and latent_std; give both (float [{c}]) or neither")
    for key, values in (('x', array), ('posterior_std', posterior_std)):
        if values is not None and not all(np.isfinite(chunk).all() for chunk in _chunks(values)):
            raise UsageError(f"{name!r}: {key} holds NaN or infinite values; expected finite float latents "
                             f"[N, C, H, W]")
    if latent_mean is None:                # the data's own statistics
        latent_mean, latent_std = latent_statistics(array, posterior_std)
        latent_std[latent_std == 0] = 1.0  # a constant channel stays constant (0) instead of dividing by 0
    mean, std = np.asarray(latent_mean, np.float64), np.asarray(latent_std, np.float64)
    if mean.shape != (c,) or std.shape != (c,) or not (np.isfinite(mean).all() and np.isfinite(std).all()
                                                        and (std > 0).all()):
        raise UsageError(f"{name!r}: latent_mean {mean.tolist()} and latent_std {std.tolist()} must be finite, "
                         f"with std > 0, one per channel of x {list(array.shape)} ({c})")
    mean, std = torch.from_numpy(mean).float(), torch.from_numpy(std).float()
    num_classes = 0
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        num_classes = int(labels.max()) + 1
    return Dataset(name, 'latent', Latents(array, posterior_std, mean, std), labels, num_classes, mean, std,
                   None if vae is None else str(vae))


# ----------------------------------------------------------------------------------------------------
# From the data to the network's range and back (images in [-1, 1], as in EDM), and pictures.

def encode(x):
    """uint8 images [..., H, W] to the network's range [-1, 1]: x / 127.5 - 1."""
    return x.float() / 127.5 - 1


def to_uint8(x):
    """Images in [-1, 1] to uint8 on x's device: clip(x * 127.5 + 128, 0, 255), as EDM and the authors' sampler
    round."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def decode(x, kind, mean=None, std=None):
    """Network outputs back to data space, as numpy: uint8 [N, H, W, C] images (kind 'image'), float [N, D] vectors
    or raw float latents [N, C, H, W] (for the VAE's decoder: vae.decode_latents). mean and std (tensors or lists,
    as a checkpoint stores them: Dataset.mean/std) undo the standardisation of vectors and latents."""
    x = x.detach().float().cpu()
    if kind == 'image':
        return to_uint8(x).permute(0, 2, 3, 1).numpy()
    mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in (mean, std))
    if kind == 'latent':
        return denormalise_latents(x, mean, std).numpy()
    return (x / SIGMA_D * std + mean).numpy()


def save_image_grid(images, path, columns=None):
    """Write uint8 images [N, H, W, C] (C = 1 or 3) as one PNG grid with a 1-pixel white border."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = (i // columns) * (h + 1) + 1, (i % columns) * (w + 1) + 1
        grid[top:top + h, left:left + w] = image
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)


def save_side_by_side(paths, labels, path, height=256, title=14, gap=8):
    """The pictures at `paths` in one PNG, side by side, each under its label and enlarged by a whole factor
    (nearest neighbour) to the nearest multiple of its height to `height` pixels: train.py shows its 1- and 2-step
    samples of the same noise so."""
    from PIL import ImageDraw
    panels = []
    for source in paths:
        with Image.open(source) as picture:
            scale = max(1, round(height / picture.height))       # 16x16 grids (137 px high) twice, not once
            panels.append(picture.convert('RGB').resize((scale * picture.width, scale * picture.height), Image.NEAREST))
    canvas = Image.new('RGB', (sum(p.width for p in panels) + gap * (len(panels) - 1),
                               title + max(p.height for p in panels)), 'white')
    left = 0
    for panel, label in zip(panels, labels):
        ImageDraw.Draw(canvas).text((left + 2, 1), label, fill='black')
        canvas.paste(panel, (left, title))
        left += panel.width + gap
    canvas.save(path)


def save_scatter(points, path, extent=None, size=256):
    """Write 2-D points [N, 2] (the first two columns of [N, D]; 1-D points on the x axis) as a density picture
    (darker = more points, log scale) on a white square.

    extent = (lo, hi) is the plotted range on both axes; by default it is fitted to the points."""
    points = np.asarray(points, dtype=np.float64)[:, :2]
    if points.shape[1] == 1:                                         # 1-D data: along the x axis, at y = 0
        points = np.concatenate([points, np.zeros_like(points)], 1)
    points = points[np.isfinite(points).all(1)]
    if extent is None:
        lo, hi = (points.min(), points.max()) if len(points) else (-1.0, 1.0)
        pad = 0.05 * (hi - lo) + 1e-6
        extent = (lo - pad, hi + pad)
    counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[extent, extent])
    density = np.log1p(counts[::-1])                                 # row 0 is the top: largest y
    density = density / max(density.max(), 1e-12)
    Image.fromarray((255 * (1 - density)).astype(np.uint8)).save(path)
