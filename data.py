"""
Training data for IMM: every dataset ends up as one tensor in memory, plus two small picture writers.

    from data import load_dataset
    data = load_dataset('cifar10', data_dir='data')   # data.x: uint8 [50000, 3, 32, 32], data.labels: int64 [50000]
    data = load_dataset('moons')                       # data.x: float32 [N, 2], standardised to sigma_d = 0.5

What `name` can be:
- 'cifar10': the 50k training images. Read from <data_dir>/cifar-10-batches-py (the python-pickle batches);
  downloaded there with torchvision only when that folder is missing.
- a folder of images (searched recursively), centre-cropped and resized to `resolution`. Images inside
  sub-folders get the sub-folder's name as their class, as torchvision's ImageFolder does.
- a .npy / .npz file: uint8 images [N, H, W, C], [N, C, H, W] or [N, H, W], or float vectors [N, D].
  A .npz holds one array, or the data under 'x' and optional int labels under 'labels'.
- a built-in 2-D toy generated in code: 'checkerboard', 'moons', 'spirals', 'gaussians8' (with labels).

Images stay uint8 here; encode() maps a batch to [-1, 1] (spec section 6) when train.py draws it. Vectors
are standardised per dimension to std sigma_d, the data scale the IMM schedules assume (spec section 2);
`mean` and `std` undo it. save_image_grid and save_scatter write the pictures that train.py and sample.py show.
"""

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SIGMA_D = 0.5                          # data std the method assumes (spec section 2)
TOYS = ('checkerboard', 'moons', 'spirals', 'gaussians8')
TOY_SIZE = 100_000                     # points drawn for a toy (a fixed set, like a real dataset)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff')
ACCEPTED = "'cifar10', a folder of images, a .npy/.npz file, or a toy: " + ', '.join(TOYS)


class UsageError(Exception):
    """Bad input from the user: the scripts print the message alone (no traceback) and exit."""


@dataclass
class Dataset:
    name: str
    kind: str                          # 'image' or 'vector'
    x: torch.Tensor                    # uint8 [N, C, H, W] images, or float32 [N, D] standardised vectors
    labels: torch.Tensor | None        # int64 [N] in [0, num_classes), or None
    num_classes: int                   # 0 when there are no labels
    mean: torch.Tensor | None = None   # float32 [D]: vectors only, x_raw = x / sigma_d * std + mean
    std: torch.Tensor | None = None


def load_dataset(name, data_dir='data', resolution=None, workers=0):
    """The dataset called `name` (see the module docstring); `workers` processes decode image folders."""
    name = str(name)
    if name in TOYS:
        points, labels = make_toy(name, TOY_SIZE)
        return _vectors(name, points, labels)
    if name == 'cifar10':
        images, labels = _read_cifar10(data_dir)
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


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one image file into (uint8 [3, R, R], error message or ''); a DataLoader runs it in workers."""

    def __init__(self, paths, resolution):
        self.paths, self.resolution = paths, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as image:
                image = _fit(image.convert('RGB'), self.resolution)
        except Exception as e:         # reported by the main process: a worker's exception carries a traceback
            return torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), \
                f"cannot read image {self.paths[i]!r} ({type(e).__name__}: {e})"
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), ''


def _read_folder(folder, resolution, workers):
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder, followlinks=True)
                   for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UsageError(f"folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if resolution is None:
        with Image.open(paths[0]) as first:
            if first.size[0] != first.size[1]:
                raise UsageError(f"{paths[0]!r} is {first.size[0]}x{first.size[1]}, not square; "
                                 f"pass --resolution to crop and resize the images")
            resolution = first.size[0]
    if resolution < 1:
        raise UsageError(f"--resolution {resolution} must be a positive number of pixels")
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, resolution), batch_size=256, num_workers=workers)
    images = []
    for batch, errors in loader:
        if any(errors):
            raise UsageError(next(e for e in errors if e))
        images.append(batch.numpy())
    images = np.concatenate(images)
    # ImageFolder layout: <folder>/<class name>/<image>; classes in sorted order.
    parents = [os.path.relpath(os.path.dirname(p), folder).split(os.sep)[0] for p in paths]
    if '.' in parents or len(set(parents)) < 2:
        return images, None
    classes = sorted(set(parents))
    return images, np.array([classes.index(p) for p in parents])


def _read_array(path, resolution):
    what = ("uint8 images [N, H, W, C], [N, C, H, W] or [N, H, W] (C = 1 or 3), "
            "or float vectors [N, D]")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"cannot read {path!r} as a numpy file ({type(e).__name__}: {e})") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if len(keys) == 1:
                array = loaded[keys[0]]
            elif 'x' in keys:
                array = loaded['x']
                labels = loaded['labels'] if 'labels' in keys else None
            else:
                raise UsageError(f"{path!r} holds arrays {keys}; expected one array, or 'x' (and optional 'labels')")
    else:
        array = loaded
    if len(array) == 0:
        raise UsageError(f"{path!r} holds an empty array {list(array.shape)}; expected {what}")
    if labels is not None:
        if labels.shape != (len(array),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise UsageError(f"labels in {path!r} are {labels.dtype} {list(labels.shape)}; "
                             f"expected non-negative integers [{len(array)}]")
    name = path
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
# Encoding images, pictures, and writing files whole.

def encode(x):
    """uint8 images [..., H, W] to the network's range [-1, 1]: x / 127.5 - 1 (spec section 6)."""
    return x.float() / 127.5 - 1


def to_uint8(x):
    """Images in [-1, 1] to uint8 on x's device: clip(x * 127.5 + 128, 0, 255) (spec section 6)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def decode(x, data):
    """Network outputs back to data space, as numpy: uint8 [N, H, W, C] images or float [N, D] vectors."""
    x = x.detach().float().cpu()
    if data.kind == 'image':
        return to_uint8(x).permute(0, 2, 3, 1).numpy()
    return (x / SIGMA_D * data.std + data.mean).numpy()


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


def save_scatter(points, path, extent=None, size=256):
    """Write 2-D points [N, 2] as a density picture (darker = more points, log scale) on a white square.

    extent = (lo, hi) is the plotted range on both axes; by default it is fitted to the points."""
    points = np.asarray(points, dtype=np.float64)[:, :2]
    points = points[np.isfinite(points).all(1)]
    if extent is None:
        lo, hi = (points.min(), points.max()) if len(points) else (-1.0, 1.0)
        pad = 0.05 * (hi - lo) + 1e-6
        extent = (lo - pad, hi + pad)
    counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[extent, extent])
    density = np.log1p(counts[::-1])                                 # row 0 is the top: largest y
    density = density / max(density.max(), 1e-12)
    Image.fromarray((255 * (1 - density)).astype(np.uint8)).save(path)


def write_atomically(path, write):
    """write(tmp), then rename tmp onto path: an interrupted run leaves the old file (or none), never half a file."""
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{os.getpid()}{ext}'  # keeps the extension: np.savez and PIL look at it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
