"""data.py as a specification: what each kind of dataset becomes, and how bad input is refused.

CIFAR-10 and MNIST are faked in their real on-disk formats (python pickles in cifar-10-batches-py, idx files in
MNIST/raw), so nothing is downloaded.
"""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repository root

from data import (SIGMA_D, TOYS, decode, load_dataset, make_toy, save_image_grid, save_scatter,  # noqa: E402
                  save_side_by_side)
from util import UsageError  # noqa: E402


def write_fake_cifar10(root, per_batch=4, seed=0):
    """data_batch_1..5 and test_batch as CIFAR-10 ships them: dicts with b'data' uint8 [N, 3072] and b'labels'."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {b'data': rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b'labels': rng.integers(0, 10, per_batch).tolist(), b'batch_label': name.encode()}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_is_read_from_the_python_batches(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    data = load_dataset('cifar10', data_dir=str(tmp_path))
    assert data.kind == 'image' and data.x.dtype == torch.uint8 and data.x.shape == (20, 3, 32, 32)
    assert data.labels.dtype == torch.int64 and data.labels.shape == (20,)
    with open(folder / 'data_batch_1', 'rb') as f:
        first = pickle.load(f, encoding='bytes')
    # row-major 3072 = 3 planes of 32 x 32 (R, G, B), the layout CIFAR-10 documents
    assert torch.equal(data.x[0], torch.from_numpy(first[b'data'][0].reshape(3, 32, 32)))
    assert data.labels[:4].tolist() == first[b'labels']
    assert data.num_classes == int(data.labels.max()) + 1


def test_cifar10_can_be_resized(tmp_path):
    write_fake_cifar10(tmp_path)
    assert load_dataset('cifar10', data_dir=str(tmp_path), resolution=16).x.shape == (20, 3, 16, 16)


def test_a_damaged_cifar10_batch_is_refused_by_name(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    (folder / 'data_batch_3').write_bytes(b'not a pickle')
    with pytest.raises(UsageError, match='data_batch_3'):
        load_dataset('cifar10', data_dir=str(tmp_path))


def test_digits_are_sklearns_1797_8x8_images_as_uint8_with_ten_classes():
    sklearn_datasets = pytest.importorskip('sklearn.datasets', reason='pip install scikit-learn')
    data = load_dataset('digits')
    assert data.kind == 'image' and data.x.dtype == torch.uint8 and data.x.shape == (1797, 1, 8, 8)
    assert data.num_classes == 10 and data.labels.dtype == torch.int64 and data.labels.unique().tolist() == list(range(10))
    digits = sklearn_datasets.load_digits()               # grey levels 0..16 become 0..255
    assert data.x.min() == 0 and data.x.max() == 255
    assert torch.equal(data.x[:, 0], torch.from_numpy(np.rint(digits.images * 255 / 16).astype(np.uint8)))
    assert data.labels.tolist() == digits.target.tolist()


def test_digits_without_scikit_learn_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'sklearn', None)     # `import sklearn...` now raises ImportError
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)
    with pytest.raises(UsageError, match='pip install scikit-learn'):
        load_dataset('digits')


def write_fake_mnist(root, n=5, seed=0):
    """The four idx files torchvision's MNIST reads from <root>/MNIST/raw (big-endian header, then the bytes):
    images: magic 0x00000803, n, 28, 28, uint8 pixels; labels: magic 0x00000801, n, uint8 labels."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
    for split in ('train', 't10k'):
        (raw / f'{split}-images-idx3-ubyte').write_bytes(np.array([0x803, n, 28, 28], '>i4').tobytes() + images.tobytes())
        (raw / f'{split}-labels-idx1-ubyte').write_bytes(np.array([0x801, n], '>i4').tobytes() + labels.tobytes())
    return images, labels


def test_mnist_is_read_from_torchvisions_idx_files_without_downloading(tmp_path, monkeypatch):
    mnist = pytest.importorskip('torchvision.datasets.mnist')

    def no_download(*args, **kwargs):
        raise AssertionError(f'a download was attempted: {args}')
    monkeypatch.setattr(mnist, 'download_and_extract_archive', no_download)
    images, labels = write_fake_mnist(tmp_path)
    data = load_dataset('mnist', data_dir=str(tmp_path))
    assert data.kind == 'image' and data.x.dtype == torch.uint8 and data.x.shape == (5, 1, 28, 28)
    assert torch.equal(data.x[:, 0], torch.from_numpy(images)) and data.labels.tolist() == labels.tolist()
    assert load_dataset('mnist', data_dir=str(tmp_path), resolution=16).x.shape == (5, 1, 16, 16)


def test_a_damaged_mnist_file_is_refused_by_folder(tmp_path):
    pytest.importorskip('torchvision')
    write_fake_mnist(tmp_path)
    (tmp_path / 'MNIST' / 'raw' / 'train-images-idx3-ubyte').write_bytes(b'not idx')
    with pytest.raises(UsageError, match='cannot read MNIST'):
        load_dataset('mnist', data_dir=str(tmp_path))


def test_toys_are_standardised_to_sigma_d_and_reproducible():
    for name in TOYS:
        data = load_dataset(name)
        assert data.kind == 'vector' and data.x.dtype == torch.float32 and data.x.shape[1] == 2
        assert torch.allclose(data.x.mean(0), torch.zeros(2), atol=1e-4)
        assert torch.allclose(data.x.std(0), torch.full((2,), SIGMA_D), atol=1e-4)
        assert data.num_classes > 0 and data.labels.shape == (len(data.x),)
        assert torch.equal(data.x, load_dataset(name).x)


def test_decode_undoes_the_standardisation():
    data = load_dataset('moons')
    points, _ = make_toy('moons', len(data.x))
    assert np.allclose(decode(data.x, data.kind, data.mean, data.std), points, atol=1e-5)


def test_decode_maps_images_to_uint8_nhwc():
    x = torch.tensor([-1.0, 0.0, 1.0, 5.0]).reshape(1, 1, 2, 2)
    out = decode(x, 'image')
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 1)
    assert out.ravel().tolist() == [0, 128, 255, 255]  # x * 127.5 + 128, clipped (docs/method.md section 1)


def test_image_arrays_in_nhwc_nchw_and_grey_layouts(tmp_path):
    nhwc = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / 'nhwc.npy', nhwc)
    np.save(tmp_path / 'nchw.npy', nhwc.transpose(0, 3, 1, 2))
    np.save(tmp_path / 'grey.npy', nhwc[..., 0])
    a, b = load_dataset(str(tmp_path / 'nhwc.npy')), load_dataset(str(tmp_path / 'nchw.npy'))
    assert a.kind == 'image' and a.x.shape == (5, 3, 8, 8) and torch.equal(a.x, b.x) and a.labels is None
    assert load_dataset(str(tmp_path / 'grey.npy')).x.shape == (5, 1, 8, 8)


def test_npz_with_labels_and_float_vectors(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(3.0, 2.0, (100, 5)).astype(np.float32)
    np.savez(tmp_path / 'v.npz', x=vectors, labels=np.arange(100) % 3)
    data = load_dataset(str(tmp_path / 'v.npz'))
    assert data.kind == 'vector' and data.x.shape == (100, 5) and data.num_classes == 3
    assert torch.allclose(data.x.std(0, unbiased=False), torch.full((5,), SIGMA_D), atol=1e-5)
    assert np.allclose(decode(data.x, data.kind, data.mean, data.std), vectors, atol=1e-4)


@pytest.mark.parametrize('array, words', [
    (np.zeros((4, 8, 8, 3), np.float32), 'float32 [4, 8, 8, 3]'),   # float images
    (np.zeros((4, 3), np.int64), 'int64 [4, 3]'),                   # integer vectors
    (np.zeros(7, np.float32), 'float32 [7]'),                       # no sample axis
    (np.zeros((4, 8, 8, 5), np.uint8), 'uint8 [4, 8, 8, 5]'),       # no channel axis of 1 or 3
    (np.zeros((0, 2), np.float32), 'empty'),
    (np.zeros((4, 0), np.float32), 'empty array [4, 0]'),          # vectors of no dimension
])
def test_arrays_of_the_wrong_shape_or_dtype_are_refused(tmp_path, array, words):
    np.save(tmp_path / 'bad.npy', array)
    with pytest.raises(UsageError, match='expected') as info:
        load_dataset(str(tmp_path / 'bad.npy'))
    assert words in str(info.value)


def test_non_square_images_need_a_resolution(tmp_path):
    np.save(tmp_path / 'wide.npy', np.zeros((2, 8, 12, 3), np.uint8))
    with pytest.raises(UsageError, match='--resolution'):
        load_dataset(str(tmp_path / 'wide.npy'))
    assert load_dataset(str(tmp_path / 'wide.npy'), resolution=4).x.shape == (2, 3, 4, 4)


def test_image_folder_is_cropped_resized_and_labelled_by_subfolder(tmp_path):
    rng = np.random.default_rng(0)
    for cls, sizes in (('cat', [(20, 10), (12, 12)]), ('dog', [(9, 30)])):
        (tmp_path / cls).mkdir()
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / cls / f'{i}.png')
    data = load_dataset(str(tmp_path), resolution=8)
    assert data.kind == 'image' and data.x.shape == (3, 3, 8, 8) and data.x.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 1] and data.num_classes == 2


def test_a_flat_image_folder_has_no_labels_and_needs_square_images_without_resolution(tmp_path):
    Image.new('RGB', (6, 6), 'red').save(tmp_path / 'a.png')
    Image.new('L', (6, 6), 9).save(tmp_path / 'b.jpg')
    data = load_dataset(str(tmp_path))
    assert data.x.shape == (2, 3, 6, 6) and data.labels is None and data.num_classes == 0
    assert data.x[0, 0, 0, 0] == 255 and data.x[0, 1, 0, 0] == 0


def test_unreadable_or_empty_folders_are_refused(tmp_path):
    with pytest.raises(UsageError, match='holds no images'):
        load_dataset(str(tmp_path))
    (tmp_path / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(UsageError, match='broken.png'):
        load_dataset(str(tmp_path), resolution=8)


def test_unknown_names_and_missing_paths_name_the_value_and_what_is_accepted(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'svhn'.*cifar10.*digits.*mnist.*moons"):
        load_dataset('svhn')
    missing = str(tmp_path / 'missing.npy')
    with pytest.raises(UsageError, match='does not exist'):
        load_dataset(missing)
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(UsageError, match='neither a folder nor'):
        load_dataset(str(tmp_path / 'notes.txt'))


def test_save_image_grid_lays_images_out_in_a_square(tmp_path):
    images = np.zeros((5, 4, 4, 3), np.uint8)
    save_image_grid(images, tmp_path / 'grid.png')
    with Image.open(tmp_path / 'grid.png') as grid:
        assert grid.size == (3 * 5 + 1, 2 * 5 + 1) and grid.mode == 'RGB'  # 3 columns, 2 rows, 1-pixel borders
    save_image_grid(images[..., :1], tmp_path / 'grey.png')
    with Image.open(tmp_path / 'grey.png') as grid:
        assert grid.mode == 'L'


def test_save_scatter_draws_points_dark_on_white(tmp_path):
    save_scatter(np.array([[0.0, 0.0]] * 10 + [[1.0, 1.0]]), tmp_path / 's.png', extent=(-2, 2), size=64)
    with Image.open(tmp_path / 's.png') as picture:
        pixels = np.asarray(picture)
    assert pixels.shape == (64, 64) and pixels.min() == 0 and (pixels == 255).mean() > 0.99
    # more points, darker; y grows upwards: the single point (1, 1) lies above and to the right of (0, 0)
    (row0, col0), = np.argwhere(pixels == 0)
    (row1, col1), = np.argwhere((pixels > 0) & (pixels < 255))
    assert row1 < row0 and col1 > col0


def test_save_scatter_draws_one_dimensional_points_along_the_x_axis(tmp_path):
    save_scatter(np.array([[-1.0]] * 5 + [[1.0]] * 5), tmp_path / 's.png', extent=(-2, 2), size=64)
    with Image.open(tmp_path / 's.png') as picture:
        rows = np.argwhere(np.asarray(picture) < 255)[:, 0]
    assert len(rows) == 2 and rows[0] == rows[1] and abs(rows[0] - 31.5) < 1  # two dots at y = 0, mid-height


def test_save_side_by_side_enlarges_each_picture_whole_under_its_label(tmp_path):
    small = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / 'a.png')
    Image.fromarray(small[:, :, 0]).save(tmp_path / 'b.png')                 # grey
    save_side_by_side([tmp_path / 'a.png', tmp_path / 'b.png'], ['1 step', '2 steps'], tmp_path / 'ab.png',
                      height=40, title=14, gap=8)
    both = np.asarray(Image.open(tmp_path / 'ab.png'))
    assert both.shape == (14 + 40, 40 + 8 + 40, 3)                             # enlarged 4x, side by side
    assert np.array_equal(both[14:, :40], small.repeat(4, 0).repeat(4, 1))
    assert np.array_equal(both[14:, 48:], small[:, :, :1].repeat(3, 2).repeat(4, 0).repeat(4, 1))
    assert (both[:14] < 128).any()                                             # the labels: dark text on white
    save_side_by_side([tmp_path / 'a.png'], ['1 step'], tmp_path / 'a2.png', height=17, title=14)
    assert np.asarray(Image.open(tmp_path / 'a2.png')).shape == (14 + 20, 20, 3)   # 1.7 rounds to 2, not down to 1
