"""ddpm_fast.data: every loader on small generated inputs, every bad input's error, flips, resumable batches,
and the image writers."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import (
    BatchStream,
    ImageDataset,
    load_dataset,
    save_grid,
    save_pngs,
    to_uint8_nhwc,
)
from ddpm_fast.errors import DataError, DDPMFastError


def _rand_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _write_images(folder, arrays, names, fmt="PNG"):
    for a, name in zip(arrays, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path, format=fmt)


# --------------------------------------------------------------------------------------------------
# errors


def test_data_error_is_a_user_facing_value_error():
    assert issubclass(DataError, DDPMFastError) and issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------------
# the bundled digits


def test_digits_default():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    x = ds.images
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.image_size == 8
    assert x.dtype == torch.float32 and tuple(x.shape) == (1797, 1, 8, 8)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # the mapping is v / 8 - 1 on the raw 0..16 pixels, image by image in sklearn's order
    raw = torch.from_numpy(load_digits().images).float()
    torch.testing.assert_close(x[:, 0], raw / 8 - 1, rtol=0, atol=0)
    assert ds.labels is not None and ds.labels.shape == (1797,)
    assert "1797 images" in ds.describe() and "1x8x8" in ds.describe()
    assert "num_images=1797" in repr(ds)
    torch.testing.assert_close(ds[5], x[5])


def test_digits_resized_to_rgb():
    ds = load_dataset("digits", image_size=16, channels=3)
    x = ds.images
    assert tuple(x.shape) == (1797, 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])


# --------------------------------------------------------------------------------------------------
# image folders


def test_png_folder_nested_grayscale(tmp_path):
    arrays = [_rand_uint8((6, 6), seed=i) for i in range(5)]
    names = ["b.png", "a.png", "sub/c.png", "sub/deeper/d.PNG", "e.png"]
    _write_images(tmp_path, arrays, names)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path)
    assert len(ds) == 5 and ds.shape == (1, 6, 6) and ds.storage_dtype == torch.uint8
    # sorted path order: a, b, e, sub/c, sub/deeper/d
    order = [1, 0, 4, 2, 3]
    expected = torch.from_numpy(np.stack([arrays[i] for i in order])).float() / 127.5 - 1
    torch.testing.assert_close(ds.images[:, 0], expected)


def test_mixed_gray_and_rgb_folder_becomes_rgb(tmp_path):
    gray = _rand_uint8((4, 5), seed=1)
    rgb = _rand_uint8((4, 5, 3), seed=2)
    _write_images(tmp_path, [gray, rgb], ["0.png", "1.png"])
    ds = load_dataset(tmp_path)
    assert ds.shape == (3, 4, 5) and ds.image_size == (4, 5)
    x = ds.images
    for c in range(3):
        torch.testing.assert_close(x[0, c], torch.from_numpy(gray).float() / 127.5 - 1)
    torch.testing.assert_close(x[1], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)
    # asking for grayscale gives Pillow's own L conversion of the RGB image
    ds1 = load_dataset(tmp_path, channels=1)
    luma = np.array(Image.fromarray(rgb).convert("L"))
    torch.testing.assert_close(ds1.images[1, 0], torch.from_numpy(luma).float() / 127.5 - 1)


def test_jpeg_folder_resized_and_center_cropped(tmp_path):
    # wide images with a distinctive center: after fit the center column must survive
    arrays = []
    for i in range(3):
        a = np.zeros((20, 40, 3), np.uint8)
        a[:, 10:30] = 200 + i * 10
        arrays.append(a)
    _write_images(tmp_path, arrays, ["x.jpg", "y.jpeg", "nested/z.JPG"], fmt="JPEG")
    _write_images(tmp_path, [_rand_uint8((30, 30, 3))], ["other_size.png"])
    ds = load_dataset(tmp_path, image_size=10)
    assert len(ds) == 4 and ds.shape == (3, 10, 10)
    # the 20x40 images crop to their central 20x20 (all bright) before shrinking to 10x10
    # sorted paths: nested/z.JPG, other_size.png, x.jpg, y.jpeg
    bright = ds.gather([0, 2, 3])
    assert bright.min() > 0.4


def test_folder_errors(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError, match="no_such_folder.*does not exist"):
        load_dataset(missing)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10")  # not 'digits' and not a path
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images found in .*empty"):
        load_dataset(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_images(mixed, [_rand_uint8((8, 8)), _rand_uint8((9, 8))], ["a.png", "b.png"])
    with pytest.raises(DataError, match="different sizes.*image.size"):
        load_dataset(mixed)
    assert load_dataset(mixed, image_size=8).shape == (1, 8, 8)


@pytest.mark.parametrize("content", [b"this is not a png", "truncated"])
def test_corrupt_image_is_named(tmp_path, content):
    _write_images(tmp_path, [_rand_uint8((16, 16, 3))], ["good.png"])
    bad = tmp_path / "sub" / "broken.png"
    bad.parent.mkdir()
    if content == "truncated":
        Image.fromarray(_rand_uint8((16, 16, 3), seed=3)).save(bad)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match="cannot read image file .*broken.png"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 batch folders


def _write_cifar(folder, sizes, test_size=None):
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, n in enumerate(sizes, start=1):
        data = _rand_uint8((n, 3072), seed=10 + i)
        labels = list(np.random.default_rng(i).integers(0, 10, n))
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": [int(v) for v in labels],
                         b"filenames": [b"x.png"] * n}, f)
        written.append((data, labels))
    if test_size:
        data = _rand_uint8((test_size, 3072), seed=99)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * test_size}, f)
        written.append((data, [0] * test_size))
    return written


def test_cifar_folder(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", [3, 2, 4], test_size=2)
    ds = load_dataset(tmp_path)  # the parent folder also works
    assert len(ds) == 9 and ds.shape == (3, 32, 32) and ds.storage_dtype == torch.uint8
    data = np.concatenate([d for d, _ in written[:3]])
    # rows are R plane, G plane, B plane
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(ds.images, expected)
    torch.testing.assert_close(ds.images[0, 1, 0, 0], torch.tensor(data[0, 1024] / 127.5 - 1, dtype=torch.float32))
    assert ds.labels.tolist() == sum((lab for _, lab in written[:3]), [])
    assert len(load_dataset(tmp_path / "cifar-10-batches-py", split="test")) == 2
    assert len(load_dataset(tmp_path, split="all")) == 11
    assert load_dataset(tmp_path, image_size=16).shape == (3, 16, 16)


def test_cifar_bad_batches(tmp_path):
    _write_cifar(tmp_path, [2])
    with pytest.raises(DataError, match="no test batch files"):
        load_dataset(tmp_path, split="test")
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="data_batch_2 must hold b'data' as uint8 \\(N, 3072\\)"):
        load_dataset(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch file .*data_batch_2"):
        load_dataset(tmp_path)

    class Evil:  # a pickle that would run code must not load
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="data_batch_2.*unexpected object"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------------
# arrays, tensors, datasets


def test_npz_nhwc_uint8(tmp_path):
    a = _rand_uint8((5, 7, 7, 3))
    np.savez(tmp_path / "samples.npz", arr_0=a, labels=np.arange(5))
    ds = load_dataset(tmp_path / "samples.npz")
    assert ds.shape == (3, 7, 7)
    torch.testing.assert_close(ds.images, torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.savez(tmp_path / "two.npz", images=a, other=a)
    with pytest.raises(DataError, match="several arrays.*array_key"):
        load_dataset(tmp_path / "two.npz")
    assert len(load_dataset(tmp_path / "two.npz", array_key="images")) == 5


def test_npy_nchw_float(tmp_path):
    a = np.random.default_rng(0).uniform(-1, 1, size=(4, 1, 5, 5)).astype(np.float64)
    np.save(tmp_path / "x.npy", a)
    ds = load_dataset(tmp_path / "x.npy")
    assert ds.shape == (1, 5, 5) and ds.storage_dtype == torch.float32
    torch.testing.assert_close(ds.images, torch.from_numpy(a).float())
    # [0, 1] data is declared, and then mapped onto [-1, 1]
    np.save(tmp_path / "unit.npy", (a + 1) / 2)
    with pytest.warns(UserWarning, match="value_range=\\(0, 1\\)"):
        load_dataset(tmp_path / "unit.npy")
    torch.testing.assert_close(load_dataset(tmp_path / "unit.npy", value_range=(0, 1)).images,
                               torch.from_numpy(a).float())


def test_array_file_errors(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read array file .*bad.npy"):
        load_dataset(tmp_path / "bad.npy")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="unsupported dataset file .*x.txt"):
        load_dataset(tmp_path / "x.txt")


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 8), np.uint8), "shape \\(4, 8\\).*4-D"),
    (np.zeros((2, 3, 4, 5, 6), np.float32), "shape .*4-D"),
    (np.zeros((2, 4, 4, 3), np.int32), "dtype torch.int32.*uint8"),
    (np.zeros((2, 3, 4, 4), np.uint8), "NHWC"),  # uint8 NumPy arrays are NHWC: channels last
    (np.zeros((2, 4, 4, 3), np.float32), "NCHW"),  # float arrays are NCHW
    (np.full((2, 1, 4, 4), 3.0, np.float32), "outside the expected range \\[-1, 1\\]"),
    (np.full((2, 1, 4, 4), np.nan, np.float32), "NaN"),
    (np.zeros((0, 1, 4, 4), np.float32), "no images"),
    (torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "NCHW"),  # torch tensors are NCHW whatever the dtype
    (torch.ones(2, 1, 4, 4, dtype=torch.bool), "dtype torch.bool"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(DataError, match=match):
        load_dataset(bad)


def test_bad_arguments():
    with pytest.raises(DataError, match="image_size must be a positive int"):
        load_dataset("digits", image_size=0)
    with pytest.raises(DataError, match="channels must be 1"):
        load_dataset("digits", channels=2)
    with pytest.raises(DataError, match="cannot load a dataset from a int"):
        load_dataset(5)


def test_tensor_inputs():
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(load_dataset(x).images, x)
    g = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(load_dataset(g).images, g.float() / 127.5 - 1)
    gray3 = torch.rand(6, 5, 5) * 2 - 1  # (N, H, W): grayscale
    assert load_dataset(gray3).shape == (1, 5, 5)
    nhwc = _rand_uint8((6, 5, 5))  # uint8 (N, H, W) array: grayscale too
    assert load_dataset(nhwc).shape == (1, 5, 5)


def test_torch_dataset_input():
    imgs = torch.rand(5, 1, 6, 6) * 2 - 1
    tds = torch.utils.data.TensorDataset(imgs, torch.arange(5))
    ds = load_dataset(tds)
    torch.testing.assert_close(ds.images, imgs)

    class PilDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.items = [Image.fromarray(_rand_uint8((6 + i, 6, 3), seed=i)) for i in range(3)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i], i

    with pytest.raises(DataError, match="different sizes.*image_size"):
        load_dataset(PilDataset())
    ds = load_dataset(PilDataset(), image_size=6)
    assert ds.shape == (3, 6, 6)
    first = torch.from_numpy(_rand_uint8((6, 6, 3), seed=0)).permute(2, 0, 1)
    torch.testing.assert_close(ds.images[0], first.float() / 127.5 - 1)
    # an ImageDataset passes through
    assert load_dataset(ds) is not ds and len(load_dataset(ds)) == 3


# --------------------------------------------------------------------------------------------------
# batches


def test_batch_stream_covers_each_epoch_once():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1) / 10 - 0.5
    stream = BatchStream(load_dataset(x), batch_size=3, seed=1)
    assert stream.batches_per_epoch == 3
    epoch0 = torch.cat([next(stream) for _ in range(3)]).flatten()
    assert len(set(epoch0.tolist())) == 9  # 9 distinct images, the 10th skipped this epoch
    epoch1 = torch.cat([next(stream) for _ in range(3)]).flatten()
    assert not torch.equal(epoch0, epoch1)  # a fresh permutation each epoch
    assert stream.epoch == 2 and stream.position == 0


def test_batch_stream_resume_equals_uninterrupted():
    ds = load_dataset(torch.rand(11, 1, 3, 4) * 2 - 1, flip=True)
    full = BatchStream(ds, batch_size=4, seed=123)
    reference = [next(full) for _ in range(12)]
    first = BatchStream(ds, batch_size=4, seed=123)
    drawn = [next(first) for _ in range(5)]
    state = first.state_dict()
    resumed = BatchStream(ds, batch_size=4, seed=999)  # the state's seed wins
    resumed.load_state_dict(dict(state))
    drawn += [next(resumed) for _ in range(7)]
    for a, b in zip(reference, drawn):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = BatchStream(ds, batch_size=4, seed=124)
    assert not torch.equal(torch.cat(reference), torch.cat([next(other) for _ in range(12)]))


def test_batch_stream_errors():
    ds = load_dataset(torch.zeros(5, 1, 2, 2))
    with pytest.raises(DataError, match="5 images, fewer than one batch of 8"):
        BatchStream(ds, batch_size=8)
    with pytest.raises(DataError, match="batch_size must be a positive int"):
        BatchStream(ds, batch_size=0)
    state = BatchStream(ds, batch_size=2).state_dict()
    with pytest.raises(DataError, match="cannot resume.*batch size 2.*batch size 1"):
        BatchStream(ds, batch_size=1).load_state_dict(state)
    with pytest.raises(DataError, match="missing or has a bad entry"):
        BatchStream(ds, batch_size=2).load_state_dict({"seed": 0})


def test_flip_flips_and_is_seeded():
    # asymmetric images: every image is a left-to-right ramp, so a flipped one is recognisable
    ramp = torch.linspace(-1, 1, 5).view(1, 1, 1, 5).expand(64, 1, 3, 5).contiguous()
    ramp = ramp * torch.linspace(0.5, 1, 64).view(64, 1, 1, 1)  # make images distinguishable
    ds = load_dataset(ramp, flip=True)
    batch = next(BatchStream(ds, batch_size=64, seed=7))
    flipped = batch[:, 0, 0, 0] > 0  # ramp now runs right-to-left
    assert 10 < int(flipped.sum()) < 54  # about half, from a fair coin
    unflipped_ref = {round(v, 5) for v in ramp[:, 0, 0, -1].tolist()}
    for img in batch:  # every image is some dataset image, flipped or not
        assert round(img.abs()[0, 0, 0].item(), 5) in unflipped_ref
    again = next(BatchStream(ds, batch_size=64, seed=7))
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    other = next(BatchStream(ds, batch_size=64, seed=8))
    assert not torch.equal(batch, other)
    no_flip = next(BatchStream(ds, batch_size=64, seed=7, flip=False))
    assert (no_flip[:, 0, 0, 0] < 0).all()
    # flip=True only mirrors: same pixels as the unflipped batch, some reversed
    torch.testing.assert_close(torch.where(flipped.view(-1, 1, 1, 1), no_flip.flip(-1), no_flip), batch)


# --------------------------------------------------------------------------------------------------
# writing images


def test_to_uint8_nhwc():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 2, 3)
    y = to_uint8_nhwc(x)
    assert y.dtype == np.uint8 and y.shape == (1, 2, 3, 1)
    assert y.ravel().tolist() == [0, 64, 128, 255, 255, 0]  # round(clamp((x+1)/2) * 255)
    rgb = torch.rand(2, 3, 4, 5) * 2 - 1
    out = to_uint8_nhwc(rgb.numpy())
    np.testing.assert_array_equal(out[1, 2, 3], ((rgb[1, :, 2, 3] + 1) / 2 * 255).round().to(torch.uint8).numpy())
    with pytest.raises(DataError, match="NaN"):
        to_uint8_nhwc(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(DataError, match="float \\(N, C, H, W\\)"):
        to_uint8_nhwc(torch.zeros(2, 2))


@pytest.mark.parametrize("n, nrow, scale, channels", [(10, None, 4, 1), (3, 5, 1, 3), (7, 2, 2, 3)])
def test_save_grid(tmp_path, n, nrow, scale, channels):
    images = _rand_uint8((n, 8, 6, channels))
    path = save_grid(images, tmp_path / "out" / "grid.png", nrow=nrow, scale=scale, padding=2)
    per_row = nrow or math.ceil(math.sqrt(n))
    ncol, rows = min(per_row, n), math.ceil(n / per_row)
    with Image.open(path) as img:
        assert img.size == (ncol * (6 * scale + 2) + 2, rows * (8 * scale + 2) + 2)
        assert img.mode == ("L" if channels == 1 else "RGB")
        grid = np.asarray(img).reshape(img.size[1], img.size[0], channels)
    # image 1 sits in the second column, upscaled by nearest neighbour
    tile = grid[2:2 + 8 * scale, 2 + 6 * scale + 2:2 + 2 * 6 * scale + 2] if ncol > 1 else None
    if tile is not None:
        np.testing.assert_array_equal(tile, images[1].repeat(scale, 0).repeat(scale, 1))
    assert not list(path.parent.glob("*.tmp"))


def test_save_pngs(tmp_path):
    images = _rand_uint8((3, 5, 5, 3))
    paths = save_pngs(images, tmp_path / "pngs", names=["seed1", "seed2", "seed3"], scale=2)
    assert [p.name for p in paths] == ["seed1.png", "seed2.png", "seed3.png"]
    with Image.open(paths[2]) as img:
        np.testing.assert_array_equal(np.asarray(img), images[2].repeat(2, 0).repeat(2, 1))
    gray_paths = save_pngs(images[:, :, :, :1], tmp_path / "g")
    assert [p.name for p in gray_paths] == ["000000.png", "000001.png", "000002.png"]
    with pytest.raises(DataError, match="uint8 \\(N, H, W, C\\).*to_uint8_nhwc"):
        save_pngs(np.zeros((2, 4, 4, 3), np.float32), tmp_path)
    with pytest.raises(DataError, match="2 names for 3 images"):
        save_pngs(images, tmp_path, names=["a", "b"])
    with pytest.raises(DataError, match="bad image name"):
        save_pngs(images, tmp_path, names=["a", "../b", "c"])


def test_dataset_to_device_and_gather():
    ds = load_dataset("digits")
    moved = ds.to("cpu")
    torch.testing.assert_close(moved.gather(torch.tensor([3, 1])), ds.images[[3, 1]])
    assert isinstance(moved, ImageDataset)
