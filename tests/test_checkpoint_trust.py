"""Checkpoints this process did not write (issue 13, items 1 and 4).

Item 1: a crafted ``train_state.pt``, RNG file, ``model/.metadata`` or byte item of a ``.distcp`` file whose
unpickling would run ``touch MARKER`` is refused with a one-line error naming the file, by every reader, and the
marker never appears; a ``latest`` that points outside the save folder is refused.
Item 4: flipped bytes in a model shard and a ``model/`` of another shape are refused (naming the file, the
tensor); a corrupted checkpoint at ``--load`` stops the run before any work and prunes nothing; a checkpoint
that fails its check after writing is not published and prunes nothing.

Every crafted folder here has no ``checksums.json`` (like one written by an older version, or by someone else),
so these tests show the pickle and shape checks on their own, and fail on the code before them.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from megatron_focusft import runtime
from megatron_focusft.models.qwen2 import ConfigError
from megatron_focusft.training import loop
from megatron_focusft.training.arguments import parse_args
from megatron_focusft.training.errors import SetupError
from megatron_focusft.training.plan import plan
from tests.test_training import _argv
from tests.training_fixtures import tiny_dataset, tiny_pretrained
from tools import convert_megatron_to_hf

RUN = ["--global-batch-size", "1", "--train-iters", "3", "--save-interval", "1"]


class RunsCommand:
    """Unpickling this runs ``touch MARKER``: what a crafted checkpoint file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("trust")
    return tiny_pretrained(root), tiny_dataset(root / "data" / "train", num_docs=8)


@pytest.fixture(scope="module")
def saved(files, tmp_path_factory) -> Path:
    """A --save folder with iter_0000001 and iter_0000002 of a 3-iteration run stopped at 2 (--exit-interval)."""
    ckpt, data = files
    out = tmp_path_factory.mktemp("saved")
    argv = _argv(ckpt, data, out, *RUN, "--save", str(out / "save"), "--exit-interval", "2", "--keep-checkpoints", "5")
    assert runtime.launch_cpu_processes(loop.main, 1, args=(argv,)) == 0
    return out / "save"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A checkpoint of another model: vocabulary 1000 (padded to 1024) where ``files`` has 256."""
    return tiny_pretrained(tmp_path_factory.mktemp("foreign"), vocab_size=1000)


def _copy(src: Path, dst: Path, unsealed: tuple[str, ...] = (".",)) -> Path:
    """A copy of checkpoint folder ``src``; the ``checksums.json`` of ``unsealed`` (sub)folders removed."""
    shutil.copytree(src, dst)
    for sub in unsealed:
        (dst / sub / "checksums.json").unlink(missing_ok=True)
    return dst


def _resume_argv(files, save: Path, out: Path, *extra: str) -> list[str]:
    ckpt, data = files
    return [*_argv(ckpt, data, out, *RUN), "--load", str(save), "--save", str(save), *extra]


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def _craft_metadata(model_dir: Path, marker: Path) -> Path:
    """A genuine ``.metadata`` (read back with plain pickle: this test wrote it) carrying one crafted object;
    the file changed."""
    with open(model_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data = {"crafted": RunsCommand(marker)}
    with open(model_dir / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return model_dir / ".metadata"


def _craft_byte_item(model_dir: Path, marker: Path) -> Path:
    """Point a layer's ``_extra_state`` item (which torch's loader unpickles with weights_only=False) at a crafted
    torch file appended to its ``.distcp`` file; that file."""
    with open(model_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    info = next(s for i, s in metadata.storage_data.items() if "_extra_state" in i.fqn)
    blob = io.BytesIO()
    torch.save([RunsCommand(marker)], blob)
    shard = model_dir / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(blob.getvalue())
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    with open(model_dir / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return shard


def _flip(path: Path, nbytes: int = 4096) -> None:
    """Invert ``nbytes`` bytes in the middle of ``path`` (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + nbytes] = bytes(b ^ 0xFF for b in data[start : start + nbytes])
    path.write_bytes(data)


# ---- item 1: nothing in a checkpoint folder runs code ------------------------------------------------------


def test_a_crafted_train_state_runs_nothing(files, saved, tmp_path):
    save, marker = _copy(saved, tmp_path / "save", ("iter_0000002",)), tmp_path / "marker"
    state = save / "iter_0000002" / "train_state.pt"
    torch.save({"state": RunsCommand(marker), "scheduler": {}, "run": {}}, state)
    with pytest.raises(SetupError) as e:
        plan(parse_args(_resume_argv(files, save, tmp_path)), world_size=1)
    assert f"{state}: refused: it would call posix.system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_a_crafted_rng_file_runs_nothing(files, saved, tmp_path, capfd):
    """The per-rank RNG file, read on every rank at --load: refused before any distributed start-up, exit 2."""
    save, marker = _copy(saved, tmp_path / "save", ("iter_0000002",)), tmp_path / "marker"
    rng = save / "iter_0000002" / "rank_state" / "rank_00000.pt"
    genuine = torch.load(rng, weights_only=True)  # written by this test's run: plain values
    torch.save({**genuine, "python": RunsCommand(marker)}, rng)
    assert runtime.launch_cpu_processes(loop.main, 1, args=(_resume_argv(files, save, tmp_path),)) == 2
    error = _one_error_line(capfd.readouterr().err)
    assert f"{rng}: refused: it would call posix.system" in error
    assert not marker.exists()
    assert (save / "latest").read_text().strip() == "iter_0000002" and not (save / "iter_0000003").exists()


def _read_as(reader: str, ckpt: Path, files, tmp_path: Path, capsys) -> str:
    """Open checkpoint ``ckpt`` as ``reader`` does; the one-line error it gives."""
    if reader == "export":
        assert convert_megatron_to_hf.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
        assert not (tmp_path / "hf").exists()
        return _one_error_line(capsys.readouterr().err)
    if reader == "--pretrained-checkpoint":
        with pytest.raises(SetupError) as e:
            plan(parse_args(_argv(ckpt, files[1], tmp_path, "--train-iters", "1")), world_size=1)
        return str(e.value)
    if reader == "--load":
        with pytest.raises(SetupError) as e:
            plan(parse_args(_resume_argv(files, ckpt.parent, tmp_path)), world_size=1)
        return str(e.value)
    from megatron_focusft.analysis.analyze import load_probe_model
    from megatron_focusft.analysis.generate import load_generation_model

    runtime.initialize("cpu")
    try:
        with pytest.raises(ConfigError) as e:
            (load_probe_model if reader == "analysis" else load_generation_model)(ckpt)
    finally:
        runtime.destroy()
    return str(e.value)


@pytest.mark.parametrize("reader", ["export", "--pretrained-checkpoint", "--load", "analysis", "evaluation"])
@pytest.mark.parametrize("crafted", ["model/.metadata", "byte item"])
def test_a_crafted_model_folder_runs_nothing_in_any_reader(files, saved, tmp_path, capsys, reader, crafted):
    """``model/.metadata`` (torch reads it with plain pickle.load) and the byte items of a ``.distcp`` file
    (torch.load(weights_only=False) in torch's loader) are screened before Megatron or torch touch the folder."""
    marker = tmp_path / "marker"
    if reader == "--load":
        ckpt = _copy(saved, tmp_path / "save", ("iter_0000002",)) / "iter_0000002"
    else:
        ckpt = _copy(files[0], tmp_path / "ckpt")
    where = (_craft_metadata if crafted == "model/.metadata" else _craft_byte_item)(ckpt / "model", marker)
    error = _read_as(reader, ckpt, files, tmp_path, capsys)
    assert "\n" not in error and str(where) in error and "refused: it would" in error and "posix.system" in error
    assert not marker.exists()


@pytest.mark.parametrize("pointer", ["../elsewhere/ckpt", "ABSOLUTE", "iter_0000001/../../elsewhere/ckpt"])
def test_a_latest_pointer_that_leaves_the_save_folder_is_refused(files, tmp_path, pointer):
    from megatron_focusft.convert.megatron_io import resolve_checkpoint

    save, elsewhere = tmp_path / "save", _copy(files[0], tmp_path / "elsewhere" / "ckpt")
    (save / "iter_0000001").mkdir(parents=True)
    (save / "latest").write_text((str(elsewhere) if pointer == "ABSOLUTE" else pointer) + "\n")
    with pytest.raises(ConfigError, match=r"latest: refused: it names .*not an iter_\* folder of"):
        resolve_checkpoint(save)
    with pytest.raises(SetupError, match="refused"):
        plan(parse_args(_resume_argv(files, save, tmp_path)), world_size=1)


def test_storage_items_outside_the_folder_are_refused(files, tmp_path, megatron_cpu):
    from megatron_focusft.attention.dense import DenseAttention
    from megatron_focusft.convert.megatron_io import load_checkpoint_model

    ckpt = _copy(files[0], tmp_path / "ckpt")
    shutil.copy(ckpt / "model" / "__0_0.distcp", tmp_path / "outside.distcp")
    with open(ckpt / "model" / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = "../../outside.distcp"
    with open(ckpt / "model" / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(ConfigError, match=r"lies in '../../outside.distcp', not a file of"):
        load_checkpoint_model(ckpt, DenseAttention)


def test_metadata_json_of_every_megatron_version_is_read_and_other_backends_refused(files, tmp_path):
    import json

    from megatron_focusft.convert.trust import CheckpointError, screen_dist_checkpoint

    model = _copy(files[0], tmp_path / "ckpt") / "model"
    for backends, refused in [
        ({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}, False),
        ({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, False),  # megatron-core 0.19
        ({"sharded_backend": "zarr", "common_backend": "torch"}, True),
        ({"sharded_backend": "torch_dist", "common_backend": "zarr"}, True),
        (["torch_dist", "torch"], True),
    ]:
        (model / "metadata.json").write_text(json.dumps(backends))
        if refused:
            with pytest.raises(CheckpointError, match=r"metadata.json: refused: backends"):
                screen_dist_checkpoint(model)
        else:
            screen_dist_checkpoint(model)


def test_checkpoints_written_before_these_checks_still_load(files, saved, tmp_path, capfd):
    """A genuine checkpoint without checksums.json, with the RNG state of older versions (numpy's own tuple,
    read with only numpy's array globals allowed): resumes, with one warning about the missing checksums, and
    its successor is sealed."""
    import numpy as np

    save = _copy(saved, tmp_path / "save", ("iter_0000001", "iter_0000002"))
    rng = save / "iter_0000002" / "rank_state" / "rank_00000.pt"
    state = torch.load(rng, weights_only=True)
    keys = state["numpy"]
    state["numpy"] = (keys["name"], keys["keys"].numpy().astype(np.uint32), keys["pos"], keys["has_gauss"], 0.0)
    torch.save(state, rng)  # exactly what the previous code wrote
    assert runtime.launch_cpu_processes(loop.main, 1, args=(_resume_argv(files, save, tmp_path),)) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "checksums.json" in line]
    assert len(warnings) == 1 and "written by an older version" in warnings[0], warnings
    assert (save / "latest").read_text().strip() == "iter_0000003"
    assert (save / "iter_0000003" / "checksums.json").is_file()


# ---- item 4: corrupted files and foreign models are refused ------------------------------------------------


def test_flipped_bytes_in_a_model_shard_are_refused(files, tmp_path, capsys):
    ckpt = _copy(files[0], tmp_path / "ckpt", unsealed=())
    shard = ckpt / "model" / "__0_0.distcp"
    _flip(shard)
    assert convert_megatron_to_hf.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert f"{shard}: checksum mismatch" in error and "restore it or use an earlier checkpoint" in error
    assert not (tmp_path / "hf").exists()


def test_with_the_checksums_skipped_sizes_pickles_and_shapes_are_still_checked(
    files, tmp_path, megatron_cpu, monkeypatch
):
    """``checksums=False`` (``--no-verify-checksums``) or ``FOCUSFT_VERIFY_CHECKSUMS=0``: the flipped shard is not
    hashed, so it loads (the garbage the hash exists to catch); a truncated one is still refused by its size."""
    from megatron_focusft.attention.dense import DenseAttention
    from megatron_focusft.convert.megatron_io import load_checkpoint_model

    ckpt = _copy(files[0], tmp_path / "ckpt", unsealed=())
    good, _, _ = load_checkpoint_model(ckpt, DenseAttention)
    shard = ckpt / "model" / "__0_0.distcp"
    _flip(shard)
    flipped, _, _ = load_checkpoint_model(ckpt, DenseAttention, checksums=False)
    changed = [
        n for n, p in flipped.state_dict().items() if torch.is_tensor(p) and not torch.equal(p, good.state_dict()[n])
    ]
    assert changed  # loaded: nothing but the hash could tell
    monkeypatch.setenv("FOCUSFT_VERIFY_CHECKSUMS", "0")
    load_checkpoint_model(ckpt, DenseAttention)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=f"{shard}: .* bytes where checksums.json records"):
        load_checkpoint_model(ckpt, DenseAttention, checksums=False)


def test_a_model_folder_of_another_shape_is_refused_naming_the_tensor(files, foreign, tmp_path, capsys):
    """A ``model/`` of another model copied into a checkpoint (no checksums to tell): every tensor's global shape
    is compared with the model's before loading, where Megatron would slice the vocabulary silently."""
    ckpt = _copy(files[0], tmp_path / "ckpt")
    shutil.rmtree(ckpt / "model")
    shutil.copytree(foreign / "model", ckpt / "model")
    assert convert_megatron_to_hf.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert (
        f"{ckpt / 'model'}: tensor embedding.word_embeddings.weight has shape [1024, 64] in the checkpoint but "
        "[256, 64] in the model"
    ) in error
    assert not (tmp_path / "hf").exists()


def test_missing_unexpected_and_unlisted_model_files_are_refused(files, foreign, tmp_path, megatron_cpu):
    import json

    from megatron_focusft.attention.dense import DenseAttention
    from megatron_focusft.convert.megatron_io import META_FILE, load_checkpoint_model

    # The model of focusft_checkpoint.json is tied (no output layer) but model/ holds one.
    tied = _copy(files[0], tmp_path / "tied")
    meta = json.loads((tied / META_FILE).read_text())
    meta["hf_config"]["tie_word_embeddings"] = True
    (tied / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="the checkpoint has unexpected tensors output_layer.weight"):
        load_checkpoint_model(tied, DenseAttention)
    # With checksums.json: the foreign files differ from the ones it lists (sizes are compared even unhashed).
    sealed = _copy(files[0], tmp_path / "sealed", unsealed=())
    shutil.rmtree(sealed / "model")
    shutil.copytree(foreign / "model", sealed / "model")
    with pytest.raises(ConfigError, match=f"{sealed / 'model'}/.* bytes where checksums.json records"):
        load_checkpoint_model(sealed, DenseAttention, checksums=False)
    added = _copy(files[0], tmp_path / "added", unsealed=())
    (added / "model" / "__0_9.distcp").write_bytes(b"x")
    with pytest.raises(ConfigError, match="__0_9.distcp: not in .*checksums.json"):
        load_checkpoint_model(added, DenseAttention)


def test_a_corrupted_checkpoint_at_load_stops_before_any_work_and_prunes_nothing(files, saved, tmp_path, capfd):
    """The report of issue 13: flipped bytes in the latest checkpoint trained on at exit 0, then the older good
    checkpoints were pruned (--keep-checkpoints).  Now: exit 2 before start-up, every checkpoint kept."""
    save = _copy(saved, tmp_path / "save", unsealed=())
    # (the largest shard: how many .distcp files a rank writes differs between megatron-core versions)
    shard = max((save / "iter_0000002" / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    _flip(shard)
    argv = _resume_argv(files, save, tmp_path, "--keep-checkpoints", "1")
    assert runtime.launch_cpu_processes(loop.main, 1, args=(argv,)) == 2
    error = _one_error_line(capfd.readouterr().err)
    assert f"--load {save}: {shard}: checksum mismatch" in error
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert (save / "latest").read_text().strip() == "iter_0000002"


def test_a_checkpoint_that_fails_its_check_after_writing_is_not_published_and_prunes_nothing(
    files, tmp_path, megatron_cpu, monkeypatch
):
    """``--keep-checkpoints`` prunes only after a newer checkpoint is written and verified: a save whose check
    fails leaves ``latest`` and the last clean checkpoint as they were (and no partial folder)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_focusft.attention.dense import DenseAttention
    from megatron_focusft.convert import trust
    from megatron_focusft.convert.megatron_io import load_checkpoint_model
    from megatron_focusft.training.checkpoint import TrainState, save_checkpoint
    from megatron_focusft.training.optimizer import CpuOptimizer, OptimizationConfig

    model, meta, _ = load_checkpoint_model(files[0], DenseAttention)
    optimizer = CpuOptimizer(model, OptimizationConfig())
    scheduler = OptimizerParamScheduler(optimizer, 0.0, 1e-5, 0.0, 0, 10, "constant", 0.0, 0.0, 10, "constant")
    save = tmp_path / "save"
    save_checkpoint(save, TrainState(iteration=1), model, optimizer, scheduler, meta, None, keep=1)
    trust.check_checkpoint(save / "iter_0000001")  # sealed: every file hashed, pickles screened

    def short_read(*args, **kwargs):
        raise trust.CheckpointError("model/__0_0.distcp: read back short")

    monkeypatch.setattr(trust, "check_shapes", short_read)
    with pytest.raises(trust.CheckpointError, match="iteration 2 failed its check after writing .*read back short"):
        save_checkpoint(save, TrainState(iteration=2), model, optimizer, scheduler, meta, None, keep=1)
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "latest"]
    assert (save / "latest").read_text().strip() == "iter_0000001"
    monkeypatch.undo()
    save_checkpoint(save, TrainState(iteration=2), model, optimizer, scheduler, meta, None, keep=1)
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", "latest"]  # verified: now pruned
