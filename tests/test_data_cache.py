"""Decode once (ddpm_fast.data.cache / decode / prepared) and feed without waiting (ddpm_fast.data.batches):
prepared folders equal the in-memory loader byte for byte, labels come along, bad input is one line and
leaves nothing half-written, and every batch path (prefetched, staged, device-resident, per rank) draws
today's batches."""

from __future__ import annotations

import errno
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from markers import needs_cuda

from ddpm_fast import cli
from ddpm_fast.data import (
    BatchStream,
    FloatSourceError,
    ImageDataset,
    cached_dataset,
    is_prepared,
    load_dataset,
    open_prepared,
    prepare_data,
    read_meta,
)
from ddpm_fast.data import batches as batches_module
from ddpm_fast.data import cache as cache_module
from ddpm_fast.data import decode as decode_module
from ddpm_fast.errors import DataError
from ddpm_fast.data.sources import array_file_dtype


def _rand_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _class_folder(root, n_per_class=6, size=(10, 7)):
    """Two class folders of RGB PNGs of size (W, H) = size, one grayscale among them."""
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(n_per_class):
            a = _rand_uint8((size[1], size[0], 3), seed=10 * c + i)
            img = Image.fromarray(a[:, :, 0], "L") if (c, i) == (1, 2) else Image.fromarray(a)
            (root / cls).mkdir(parents=True, exist_ok=True)
            img.save(root / cls / f"{i:03d}.png")
    return root


def _edm_zip(path, n=7, size=6, labels=True):
    """A zip as EDM's dataset_tool.py writes it: 00000/img00000000.png ..., dataset.json with [name, label]."""
    names = [f"{i // 5:05d}/img{i:08d}.png" for i in range(n)]
    arrays = [_rand_uint8((size, size, 3), seed=100 + i) for i in range(n)]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, a in zip(names, arrays):
            import io

            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
        meta = {"labels": [[name, i % 3] for i, name in enumerate(names)] if labels else None}
        z.writestr("dataset.json", json.dumps(meta))
    return path, np.stack(arrays), np.arange(n) % 3


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_DATA_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------------
# decode once


@pytest.mark.parametrize("image_size", [None, 5])
def test_prepared_folder_equals_the_in_memory_loader_with_class_labels(tmp_path, monkeypatch, image_size):
    folder = _class_folder(tmp_path / "imgs")
    monkeypatch.setattr(decode_module, "_SERIAL_BELOW", 0)  # worker processes even for 12 files
    monkeypatch.setattr(decode_module, "_CHUNK", 5)
    out = prepare_data(folder, tmp_path / "prep", image_size=image_size, workers=2, progress=False)
    mapped = open_prepared(out)
    memory = load_dataset(folder, image_size=image_size, workers=1)
    assert mapped.mapped and not memory.mapped and mapped.pixels.dtype == torch.uint8
    assert torch.equal(mapped.pixels, memory.pixels) and mapped.shape == memory.shape
    assert mapped.shape == ((3, 7, 10) if image_size is None else (3, 5, 5))
    if image_size is None:  # pixel for pixel what Pillow decodes (the gray image repeated to RGB)
        ref = np.asarray(Image.open(folder / "dog" / "002.png").convert("RGB"))
        np.testing.assert_array_equal(mapped.pixels[8].numpy(), ref)
    assert mapped.labels.tolist() == [0] * 6 + [1] * 6 and torch.equal(mapped.labels, memory.labels)
    meta = read_meta(out)
    assert meta["labels"]["class_names"] == ["cat", "dog"] and meta["num_images"] == 12
    assert meta["source_kind"] == "image folder" and len(meta["sha256"]) == 64
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "labels.npy", "meta.json"]
    assert not list(tmp_path.glob(".prep.tmp-*"))


def test_edm_zip_with_labels(tmp_path):
    path, arrays, labels = _edm_zip(tmp_path / "ds.zip")
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.pixels.numpy(), arrays)
    assert ds.labels.tolist() == labels.tolist()
    prepared = open_prepared(prepare_data(path, tmp_path / "p", progress=False))
    assert torch.equal(prepared.pixels, ds.pixels) and prepared.labels.tolist() == labels.tolist()
    assert read_meta(tmp_path / "p")["labels"]["from"] == "dataset.json"
    unlabelled, _, _ = _edm_zip(tmp_path / "nolabels.zip", labels=False)
    assert load_dataset(unlabelled).labels is None


def test_a_bad_file_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    folder = _class_folder(tmp_path / "imgs")
    (folder / "dog" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header, then garbage
    monkeypatch.setattr(decode_module, "_SERIAL_BELOW", 0)
    monkeypatch.setattr(decode_module, "_CHUNK", 3)
    with pytest.raises(DataError, match=r"cannot read image file .*dog/004.png"):
        prepare_data(folder, tmp_path / "prep", workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prep.lock", "imgs"]  # no folder, no temp left


def test_cache_is_reused_then_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    folder = _class_folder(tmp_path / "imgs")
    first = cached_dataset(folder, progress=False)
    assert first.mapped and str(tmp_path / "cache") in first.mapped

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an up-to-date cache")

    with monkeypatch.context() as m:
        m.setattr(cache_module, "_build", no_build)
        again = cached_dataset(folder, progress=False)
    assert again.mapped == first.mapped and torch.equal(again.pixels, first.pixels)
    # other options: another cache entry
    assert cached_dataset(folder, image_size=4, progress=False).mapped != first.mapped
    # a changed image: rebuilt, and the new pixels are served
    new = _rand_uint8((7, 10, 3), seed=99)
    Image.fromarray(new).save(folder / "cat" / "000.png")
    os.utime(folder / "cat" / "000.png", ns=(1, 1))  # a different mtime even on a coarse clock
    rebuilt = cached_dataset(folder, progress=False)
    np.testing.assert_array_equal(rebuilt.pixels[0].numpy(), new)
    assert torch.equal(first.pixels[0], torch.from_numpy(new)) is False  # the old mapping still reads old data


def test_an_interrupted_build_is_never_used(tmp_path, monkeypatch):
    src = tmp_path / "x.npy"
    np.save(src, _rand_uint8((9, 4, 4, 3)))
    real = cache_module._build

    def dies_after_writing(path, out, *args):
        real(path, out, *args)
        (out / "meta.json").unlink()  # as if killed before the last step
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_build", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(src, tmp_path / "prep", progress=False)
    assert not (tmp_path / "prep").exists() and not list(tmp_path.glob(".prep.tmp-*"))
    # a temp folder left by a process killed -9 is not read, and is cleared by the next build
    (tmp_path / ".prep.tmp-12345").mkdir()
    monkeypatch.setattr(cache_module, "_build", real)
    out = prepare_data(src, tmp_path / "prep", progress=False)
    assert is_prepared(out) and not list(tmp_path.glob(".prep.tmp-*"))
    np.testing.assert_array_equal(open_prepared(out).pixels.numpy(), np.load(src))


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    src = tmp_path / "x.npy"
    np.save(src, _rand_uint8((9, 4, 4, 3)))

    def enospc(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", enospc)
    with pytest.raises(DataError, match="no space left on the disk .*--data-cache"):
        prepare_data(src, tmp_path / "prep", progress=False)
    assert not (tmp_path / "prep").exists()
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(DataError, match=r"needs 0.00 GB, 0.00 GB free"):
        prepare_data(src, tmp_path / "prep", progress=False)


def test_arrays_cifar_and_float_sources(tmp_path):
    x = _rand_uint8((10, 6, 8, 3))
    np.save(tmp_path / "x.npy", x)
    for kwargs in ({}, {"image_size": 4, "channels": 1}):
        prepared = open_prepared(prepare_data(tmp_path / "x.npy", tmp_path / f"p{len(kwargs)}", progress=False,
                                              **kwargs))
        assert torch.equal(prepared.pixels, load_dataset(tmp_path / "x.npy", **kwargs).pixels)
    np.save(tmp_path / "f.npy", np.zeros((3, 1, 4, 4), np.float32))
    np.savez_compressed(tmp_path / "f.npz", images=np.zeros((3, 4, 4, 1), np.float64), labels=np.arange(3))
    # refused from the header: no lock, no temp folder, nothing under the cache root
    for source, kwargs, dtype in (("f.npy", {}, "float32"), ("f.npz", {"array_key": "images"}, "float64")):
        with pytest.raises(FloatSourceError, match=f"holds {dtype} images: prepared data is uint8, so it stays in memory"):
            prepare_data(tmp_path / source, cache_root=tmp_path / "cache", progress=False, **kwargs)
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))
    with pytest.raises(DataError, match="has no array 'x'; its arrays are"):
        prepare_data(tmp_path / "f.npz", array_key="x", cache_root=tmp_path / "cache", progress=False)
    with pytest.raises(FloatSourceError, match="stays in memory"):
        prepare_data(tmp_path / "f.npy", tmp_path / "pf", progress=False)
    # the header probe agrees with the arrays (also for numpy's format 2.0 headers)
    np.save(tmp_path / "u.npy", np.zeros((2, 3, 3, 1), np.uint8))
    assert array_file_dtype(tmp_path / "u.npy")[0] == np.uint8
    assert array_file_dtype(tmp_path / "f.npz", "images") == (np.dtype("float64"), f"array 'images' in {tmp_path / 'f.npz'}")
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, np.zeros((2, 2), np.float16), version=(2, 0))
    np.savez(tmp_path / "v2.npz", arr_0=np.zeros((2, 2), np.int16))
    assert array_file_dtype(tmp_path / "v2.npy")[0] == np.float16 and array_file_dtype(tmp_path / "v2.npz")[0] == np.int16
    import pickle

    cifar = tmp_path / "cifar"
    cifar.mkdir()
    data = _rand_uint8((4, 3072), seed=3)
    (cifar / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 1, 4, 1]}))
    prepared = open_prepared(prepare_data(cifar, tmp_path / "pc", progress=False))
    assert torch.equal(prepared.pixels, load_dataset(cifar).pixels) and prepared.labels.tolist() == [3, 1, 4, 1]
    with pytest.raises(DataError, match="not a prepared-data folder"):
        prepare_data(tmp_path / "x.npy", cifar, progress=False)


def test_cli_prepare_data(tmp_path, capsys):
    path, _, _ = _edm_zip(tmp_path / "ds.zip")
    assert cli.main(["prepare-data", str(path), "--out", str(tmp_path / "p"), "--image-size", "4",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"prepared {tmp_path / 'p'}: 7 images of 3x4x4") and "7 labels from dataset.json" in out
    assert cli.main(["prepare-data", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error: dataset path") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# batches


def _draw(stream, n):
    return [next(stream) for _ in range(n)]


def test_every_batch_path_draws_the_same_batches(tmp_path):
    x = _rand_uint8((23, 5, 6, 3), seed=4)
    np.save(tmp_path / "x.npy", x)
    memory = load_dataset(tmp_path / "x.npy", flip=True)
    mapped = open_prepared(prepare_data(tmp_path / "x.npy", tmp_path / "p", progress=False), flip=True)
    reference = _draw(BatchStream(memory, 6, seed=5, prefetch=False), 9)  # 3 per epoch: three epochs
    for ds, kw in [(memory, {}), (mapped, {}), (mapped, {"staged": True}), (memory, {"channels_last": True})]:
        got = _draw(BatchStream(ds, 6, seed=5, **kw), 9)
        for a, b in zip(reference, got):
            assert torch.equal(a, b)
            assert a.is_contiguous() and (b.is_contiguous(memory_format=torch.channels_last) or b.is_contiguous())
    # under torchrun each rank's share is its slice of the global batch, and it reads only that slice
    for rank in range(3):
        stream = BatchStream(mapped, 6, seed=5, rank=rank, world_size=3)
        for ref, part in zip(reference, _draw(stream, 9)):
            assert torch.equal(ref[2 * rank:2 * rank + 2], part)


def test_prefetched_stream_resumes_mid_epoch(tmp_path):
    ds = load_dataset(torch.randint(0, 256, (11, 3, 4, 4), dtype=torch.uint8), flip=True)
    reference = _draw(BatchStream(ds, 4, seed=9, prefetch=False), 8)
    first = BatchStream(ds, 4, seed=9, staged=True)
    drawn = _draw(first, 3)  # the thread has run ahead; the state is what was drawn
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)
    resumed = BatchStream(ds, 4, seed=0)
    resumed.load_state_dict(state)
    drawn += _draw(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(reference, drawn))
    for _ in range(3):  # a running stream rewinds too, again and again (its staging buffers come back)
        first.load_state_dict(state)
        assert all(torch.equal(next(first), ref) for ref in reference[3:8])
    first.close()


def test_a_device_resident_dataset_gets_its_plan_once_per_epoch(monkeypatch):
    # The CPU half of the CUDA check: the order and flips reach the device through host_to_device once
    # per epoch (pinned, non-blocking), never per step. "meta" stands in for the device.
    calls = []

    def record(x, device):
        calls.append((x.dtype, str(device)))
        return x

    monkeypatch.setattr(batches_module, "host_to_device", record)
    plans = batches_module._Plans(10, seed=1, flip=True, device=torch.device("meta"))
    slicer = batches_module._Slicer(plans, batches_per_epoch=3, batch_size=3, rank=0, world_size=1)
    for n in range(6):
        slicer(n)
    assert calls == [(torch.int64, "meta"), (torch.bool, "meta")] * 2


def test_a_failing_gather_reaches_the_consumer():
    class Broken(ImageDataset):
        def gather_pixels(self, indices, out=None):
            raise RuntimeError("disk read failed")

    ds = Broken(torch.zeros(4, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="disk read failed"):
        next(BatchStream(ds, 2))


@needs_cuda
def test_cuda_feeding_has_no_host_wait():
    ds = load_dataset(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), flip=True)
    reference = _draw(BatchStream(ds, 8, seed=3, prefetch=False), 12)
    resident = BatchStream(ds.to("cuda"), 8, seed=3)
    staged = BatchStream(ds, 8, seed=3, device="cuda", channels_last=True)
    next(resident), next(staged)  # allocations and the first plan upload outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        got_resident = _draw(resident, 11)
        got_staged = _draw(staged, 11)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for ref, a, b in zip(reference[1:], got_resident, got_staged):
        assert torch.equal(ref, a.cpu()) and torch.equal(ref, b.cpu())
    staged.close()


# --------------------------------------------------------------------------------------------------
# training: the weights do not depend on the feeding path


def _train_config(tmp_path, data, out, **kw):
    from ddpm_fast.training import TrainConfig

    base = dict(data=str(data), out=str(tmp_path / out), preset="tiny", steps=9, batch_size=6, flip=True,
                save_every=4, sample_every=0, log_every=3, progress=False, unet={"block_out_channels": [8, 16]},
                device="cpu", data_cache=str(tmp_path / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def test_weights_equal_from_cache_memory_and_after_resume_mid_epoch(tmp_path):
    from ddpm_fast.checkpoint import load_checkpoint
    from ddpm_fast.training import train

    torch.set_num_threads(1)
    np.save(tmp_path / "x.npy", _rand_uint8((20, 8, 8, 3), seed=8))  # 3 batches of 6 per epoch
    cached = train(_train_config(tmp_path, tmp_path / "x.npy", "cached"))
    memory = train(_train_config(tmp_path, tmp_path / "x.npy", "memory", data_cache="off"))
    # stopped at step 4 (mid-epoch 1), resumed to 9 from the prepared folder, read into RAM this time
    train(_train_config(tmp_path, tmp_path / "x.npy", "resumed", steps=4))
    resumed = train(_train_config(tmp_path, tmp_path / "x.npy", "resumed", resume=True, data_in_memory=True))
    assert resumed.resumed_from == 4
    weights = [load_checkpoint(r.run_dir) for r in (cached, memory, resumed)]
    assert all(w.step == 9 for w in weights)
    for name, value in weights[0].model.items():
        assert torch.equal(value, weights[1].model[name]) and torch.equal(value, weights[2].model[name]), name
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the prepared folder and its lock, once
