"""Checkpoints: round trips, crash safety of every write, and one-line errors for bad files."""

import json
import os

import pytest
import torch

from ddpm_fast import checkpoint as ckpt_mod
from ddpm_fast.checkpoint import (
    build_model,
    find_latest_checkpoint,
    load_checkpoint,
    load_weights_file,
    save_checkpoint,
    strip_compile_prefix,
)
from ddpm_fast.errors import CheckpointError
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.unet import UNet, UNetConfig

TINY = UNetConfig.tiny(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16))


pytestmark = pytest.mark.usefixtures("single_thread")


def _config():
    return {"format": "ddpm-fast-run", "version": 1, "unet": TINY.to_dict(),
            "schedule": NoiseSchedule.linear(50).to_config(), "train": {"seed": 3}}


def _weights(seed):
    torch.manual_seed(seed)
    return UNet(TINY).state_dict()


def _save(run_dir, step, seed=None, **kw):
    seed = step if seed is None else seed
    model, ema = _weights(seed), _weights(seed + 1000)
    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(3, generator=torch.Generator().manual_seed(seed))}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]},
             "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)},
             "batch_stream": {"epoch": 2, "position": step}}
    folder = save_checkpoint(run_dir, step=step, config=_config(), model=model, ema=ema, state=state, **kw)
    return folder, model, ema, state


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_restores_everything(tmp_path):
    folder, model, ema, state = _save(tmp_path, 7)
    assert folder == tmp_path / "checkpoints" / "step_000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"
    for source in (tmp_path, folder):  # the run folder follows "latest"
        c = load_checkpoint(source)
        assert c.step == 7 and c.path == folder and c.config == _config()
        _assert_same(c.model, model)
        _assert_same(c.ema, ema)
        assert torch.equal(c.state["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
        assert c.state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
        assert torch.equal(c.state["rng"]["torch"], state["rng"]["torch"])
        assert c.state["batch_stream"] == {"epoch": 2, "position": 7}
    no_state = load_checkpoint(folder, with_state=False)
    assert no_state.state is None and no_state.step == 7


def test_single_weights_file_is_self_contained(tmp_path):
    folder, model, ema, _ = _save(tmp_path, 3)
    c = load_checkpoint(folder / "ema.safetensors")
    assert c.ema is None and c.step == 3 and c.config == _config()  # config from the safetensors metadata
    _assert_same(c.model, ema)
    rebuilt = build_model(c.config["unet"], c.model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 49])
    reference = UNet(TINY)
    reference.load_state_dict(ema)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), reference(x, t), rtol=0, atol=0)


def test_compile_prefix_is_stripped(tmp_path):
    weights = _weights(0)
    prefixed = {f"_orig_mod.{k}": v for k, v in weights.items()}
    assert strip_compile_prefix(prefixed).keys() == weights.keys()
    # a checkpoint written from a compiled module's state dict loads into a plain UNet
    save_checkpoint(tmp_path, step=1, config=_config(), model=prefixed, ema=prefixed, state={})
    c = load_checkpoint(tmp_path)
    _assert_same(c.model, weights)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in prefixed.items()}, str(tmp_path / "raw.safetensors"),
              metadata={"ddpm_fast_config": json.dumps(_config())})
    loaded, _ = load_weights_file(tmp_path / "raw.safetensors")
    _assert_same(loaded, weights)
    build_model(TINY.to_dict(), prefixed)  # build_model strips too


def test_old_checkpoints_are_pruned_after_latest_moves(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000003", "step_000004"]
    with pytest.raises(ValueError, match="keep"):
        _save(tmp_path, 5, keep=0)


def test_missing_latest_pointer_falls_back_to_newest_complete(tmp_path):
    _save(tmp_path, 1, keep=5)
    _save(tmp_path, 2, keep=5)
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "step_000002" / "state.pt").unlink()  # incomplete: skipped
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"


# ------------------------------------------------------------------------------------------------
# crash safety: a write that dies midway leaves the previous checkpoint loadable


def _half_writer(real):
    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = args[1]
        with open(path, "r+b") as f:  # leave a truncated file behind, then die as a kill would
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated crash while writing")

    return write


@pytest.mark.parametrize("failure", ["model_write", "state_write", "replace_state", "replace_latest"])
def test_failed_write_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch, failure):
    folder1, model1, ema1, _ = _save(tmp_path, 1)
    if failure == "model_write":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _half_writer(safetensors.torch.save_file))
    elif failure == "state_write":
        real_save = torch.save

        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(10)
            raise OSError("simulated crash while writing")

        monkeypatch.setattr(torch, "save", dying_save)
    else:
        target = "state.pt" if failure == "replace_state" else "latest"
        real_replace = os.replace

        def failing_replace(src, dst):
            if os.path.basename(dst) == target:
                raise OSError("simulated crash at rename")
            return real_replace(src, dst)

        monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)

    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2)
    monkeypatch.undo()

    c = load_checkpoint(tmp_path)
    assert c.step == 1 and c.path == folder1
    _assert_same(c.model, model1)
    _assert_same(c.ema, ema1)
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []  # temporary files are cleaned up
    # and the next save succeeds and becomes the latest
    _save(tmp_path, 2)
    assert load_checkpoint(tmp_path).step == 2


# ------------------------------------------------------------------------------------------------
# bad files: one line naming the file, never a traceback from deep inside a library


def _one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_truncated_safetensors(tmp_path):
    folder, *_ = _save(tmp_path, 1)
    path = folder / "ema.safetensors"
    data = path.read_bytes()
    for cut in (len(data) // 2, 5, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path)
        msg = _one_line(e)
        assert "ema.safetensors" in msg and "truncated or not a safetensors file" in msg


def test_foreign_safetensors_names_key_mismatch(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3), "conv_in.weight": torch.zeros(8, 1, 3, 3)}, str(path),
              metadata={"ddpm_fast_config": json.dumps(_config())})
    c = load_checkpoint(path)
    with pytest.raises(CheckpointError) as e:
        build_model(c.config["unet"], c.model, source=path)
    msg = _one_line(e)
    assert "foreign.safetensors" in msg and "missing" in msg and "unexpected 1 keys: encoder.weight" in msg


def test_wrong_shapes_are_named(tmp_path):
    weights = _weights(0)
    weights["conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(CheckpointError) as e:
        build_model(TINY.to_dict(), weights, source="w.safetensors")
    msg = _one_line(e)
    assert "conv_in.weight" in msg and "(8, 3, 3, 3)" in msg and "(8, 1, 3, 3)" in msg


def test_safetensors_without_config(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="carries no ddpm-fast config"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["delete_ema", "truncate_state", "garbage_state", "garbage_config",
                                    "config_not_ours", "latest_garbage", "latest_dangling"])
def test_damaged_checkpoint_folder(tmp_path, damage):
    folder, *_ = _save(tmp_path, 1)
    latest = tmp_path / "checkpoints" / "latest"
    expect = {
        "delete_ema": "ema.safetensors is missing",
        "truncate_state": "state.pt is truncated or not a ddpm-fast training state",
        "garbage_state": "state.pt is truncated or not a ddpm-fast training state",
        "garbage_config": "config.json is not valid JSON",
        "config_not_ours": "is not a ddpm-fast config",
        "latest_garbage": "is corrupt",
        "latest_dangling": "which is missing",
    }[damage]
    if damage == "delete_ema":
        (folder / "ema.safetensors").unlink()
    elif damage == "truncate_state":
        data = (folder / "state.pt").read_bytes()
        (folder / "state.pt").write_bytes(data[: len(data) // 3])
    elif damage == "garbage_state":
        (folder / "state.pt").write_bytes(b"\x80\x04not a pickle at all")
    elif damage == "garbage_config":
        (folder / "config.json").write_text("{ not json")
    elif damage == "config_not_ours":
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    elif damage == "latest_garbage":
        latest.write_text("../../etc")
    elif damage == "latest_dangling":
        latest.write_text("step_000099\n")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert expect in _one_line(e)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint yet"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------
# integrity: SHA256SUMS written with every checkpoint and export, verified on load


def _flip_bits(path, count=8):
    """Flip ``count`` bits spread over the payload of a safetensors file (past its JSON header)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for k in range(count):
        data[header + (len(data) - header) * (k + 1) // (count + 1)] ^= 1 << (k % 8)
    path.write_bytes(bytes(data))


def test_checkpoint_records_sha256sum_compatible_hashes(tmp_path):
    import hashlib
    import shutil
    import subprocess

    folder, *_ = _save(tmp_path, 4)
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    names = sorted(["model.safetensors", "ema.safetensors", "config.json", "state.pt"])
    assert [line.split("  ")[1] for line in lines] == names
    for line in lines:
        digest, name = line.split("  ")
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    if shutil.which("sha256sum"):  # the record checks without ddpm-fast too
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=folder).returncode == 0


def test_flipped_weight_bits_are_refused_with_one_line(tmp_path, capsys):
    from cli_helpers import error_line

    from ddpm_fast import cli

    folder, *_ = _save(tmp_path, 2)
    _flip_bits(folder / "ema.safetensors")
    load_weights_file(folder / "model.safetensors")  # the other files still load
    with pytest.raises(CheckpointError, match=r"ema.safetensors is damaged: its sha256 .* recorded in SHA256SUMS"):
        load_checkpoint(tmp_path)
    assert cli.main(["sample", str(tmp_path), "--out", str(tmp_path / "s"), "--seeds", "0-1", "--steps", "2",
                     "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "ema.safetensors is damaged" in line and "copy it again from a good source" in line
    assert not (tmp_path / "s" / "samples.npz").exists()


@pytest.mark.parametrize("damage", ["state", "config", "sums"])
def test_other_recorded_files_are_verified(tmp_path, damage):
    folder, *_ = _save(tmp_path, 2)
    if damage == "state":  # another valid training state (a file copied from elsewhere)
        torch.save({"step": 2, "batch_stream": {"epoch": 0, "position": 0}}, folder / "state.pt")
    elif damage == "config":  # still valid JSON of the right shape, but not what was saved
        config = json.loads((folder / "config.json").read_text())
        config["train"]["seed"] = 4
        (folder / "config.json").write_text(json.dumps(config))
    else:
        (folder / "SHA256SUMS").write_text("not a record\n")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    msg = _one_line(e)
    assert ("SHA256SUMS is damaged" if damage == "sums" else "is damaged: its sha256") in msg


def test_folders_without_a_record_load_as_before(tmp_path):
    from ddpm_fast.diffusers_io import SAFETENSORS_NAME, load_diffusers_unet, save_diffusers_unet

    folder, model, ema, _ = _save(tmp_path, 2)
    (folder / "SHA256SUMS").unlink()  # a checkpoint from before the record
    _assert_same(load_checkpoint(tmp_path).ema, strip_compile_prefix(ema))
    torch.manual_seed(0)
    exported = save_diffusers_unet(UNet(TINY), tmp_path / "export")
    load_diffusers_unet(exported)
    _flip_bits(exported / SAFETENSORS_NAME)
    with pytest.raises(ValueError, match="is damaged"):
        load_diffusers_unet(exported)  # our export carries a record
    (exported / "SHA256SUMS").unlink()  # a folder written by diffusers or the hub: loads as today
    load_diffusers_unet(exported)
