"""Packed shards (``python -m deit_train.pack``, ``data=shards``): a byte-identical round trip, the same training
stream as the folder it was packed from (workers, ranks, repeated augmentation, train_fraction), exact resume,
an exact teacher cache keyed by the pack's content, and one line for every bad pack."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import ImageFolder

from conftest import FAST_DIGITS, compose_config, train_preempted_then_resumed
from deit_train.data import AugmentRecipe, ImageFolderDataModule, ShardsDataModule
from deit_train.data.device_augment import DeviceFinish
from deit_train.data.images import CorruptImageError
from deit_train.data.pack import pack_folder
from deit_train.errors import ConfigError, find_config_error
from deit_train.train import train

DEIT = dict(name="deit", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)


def _digits_folder(root: Path, per_class: dict[str, int], suffix: str = "png") -> Path:
    """The first images of each digit as 8x8 greyscale PNGs (or ``suffix`` files) in ImageNet layout
    (root/<split>/<digit>/<n>.png)."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    taken = {label: 0 for label in range(10)}
    for split, count in per_class.items():
        for label in range(10):
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            for n in range(count):
                position = np.flatnonzero(digits.target == label)[taken[label]]
                taken[label] += 1
                Image.fromarray(images[position], mode="L").save(folder / f"{n:03d}.{suffix}")
    return root


@pytest.fixture(scope="module")
def digits_pack(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, pack): 8 train and 3 val digits per class, packed by two workers."""
    folder = _digits_folder(tmp_path_factory.mktemp("digits") / "folder", {"train": 8, "val": 3})
    pack = folder.parent / "pack"
    pack_folder(folder, pack, workers=2)
    return folder, pack


@pytest.fixture(scope="module")
def digits_jpeg_pack(tmp_path_factory) -> Path:
    """The digits as greyscale JPEGs, packed: what the device decodes (augment.device_decode)."""
    folder = _digits_folder(tmp_path_factory.mktemp("digits_jpeg") / "folder", {"train": 8, "val": 3}, "jpg")
    pack_folder(folder, folder.parent / "pack", workers=1)
    return folder.parent / "pack"


def _files(root: Path, split: str) -> list[tuple[Path, int]]:
    return [(Path(p), label) for p, label in ImageFolder(str(root / split), loader=lambda p: p).samples]


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError:  # the broken file
        return (0, 0)


def test_pack_round_trip_is_byte_identical_and_resized_images_are_within_max_side(tmp_path):
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    sizes = {"train": [(40, 30), (30, 41), (100, 60), (64, 64)], "val": [(20, 20), (90, 120)]}
    for split, shapes in sizes.items():
        for n, (width, height) in enumerate(shapes):
            (folder / split / f"c{n % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
                folder / split / f"c{n % 2}" / f"{n}.jpg", quality=95)
    (folder / "train" / "c1" / "9-broken.jpg").write_bytes(b"not an image")  # stored as is, met at training
    meta = pack_folder(folder, tmp_path / "pack", max_side=64, quality=80, workers=2)
    dm = ShardsDataModule(root=str(tmp_path / "pack"), num_workers=0)
    dm.setup()
    assert dm.classes == ["c0", "c1"] and meta["classes"] == ["c0", "c1"]
    resized = 0
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
        files = _files(folder, split)
        assert len(dataset) == len(files) and dataset.targets == [label for _, label in files]
        for index, (path, label) in enumerate(files):
            item = dataset.read(index)
            assert (item["label"], item["name"]) == (label, str(path.relative_to(folder)))
            original = path.read_bytes()
            size = _size(path)
            if max(size) > 64:  # resized to a longer side of exactly 64, re-encoded at the stated quality
                resized += 1
                with Image.open(io.BytesIO(item["image"])) as stored:
                    assert max(stored.size) == 64 and stored.format == "JPEG"
                    assert abs(stored.size[0] / stored.size[1] - size[0] / size[1]) < 0.05
                assert item["kind"] == "resized"
            else:
                assert item["image"] == original and item["kind"] in ("original", "unreadable")
    assert resized == 2
    # the offset-table layout (one slice per random read), not litdata's Arrow batches (a batch decoded per read)
    leaves = json.loads((tmp_path / "pack" / "train" / "index.json").read_text())["config"]["data_format"]
    assert "file" in leaves and "bytes" not in leaves
    assert meta["splits"]["train"]["kinds"] == {"original": 3, "resized": 1, "unreadable": 1}
    assert meta["splits"]["train"]["unreadable_examples"] == ["train/c1/9-broken.jpg"]
    with pytest.raises(CorruptImageError, match=r"train\[4\] \(train/c1/9-broken.jpg\)"):
        dm.train_set[4]
    # the digest is the content's: packed again elsewhere (one worker) it is the same; other bytes, another one
    again = pack_folder(folder, tmp_path / "again", max_side=64, quality=80, workers=1)
    assert again["digest"] == meta["digest"]
    assert pack_folder(folder, tmp_path / "q90", max_side=64, quality=90)["digest"] != meta["digest"]


def _batches(dm, replicas: int = 1, rank: int = 0, epochs=(0, 1)) -> list[str]:
    dm.setup()
    loader = dm.train_loader(replicas, rank)
    hashes = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            images, target = dm.batch_to_device(batch, "cpu")  # as a training step sees it
            hashes.append(hashlib.sha256(images.numpy().tobytes() + target.numpy().tobytes()).hexdigest())
    return hashes


@pytest.mark.parametrize("options", [{}, {"train_fraction": 0.5, "split_seed": 3}, {"repeated_aug": 3}],
                         ids=["whole", "train_fraction", "repeated_aug"])
def test_shards_give_the_folders_training_stream_on_every_rank_and_any_workers(digits_pack, options):
    folder, pack = digits_pack
    recipe = AugmentRecipe(**DEIT, repeated_aug=options.pop("repeated_aug", 1))
    common = dict(image_size=16, batch_size=8, recipe=recipe, seed=5, pin_memory=False, **options)
    for replicas, rank in ((1, 0), (2, 1)):
        expected = _batches(ImageFolderDataModule(root=str(folder), num_workers=0, **common), replicas, rank)
        assert len(set(expected)) == len(expected) > 2
        assert _batches(ShardsDataModule(root=str(pack), num_workers=0, **common), replicas, rank) == expected
    assert _batches(ShardsDataModule(root=str(pack), num_workers=2, **common), 2, 1) == expected


def test_device_decode_on_shards_gives_the_same_batches_with_any_workers(digits_jpeg_pack):
    recipe = AugmentRecipe(**DEIT, device=True, device_decode=True)
    common = dict(root=str(digits_jpeg_pack), image_size=16, batch_size=8, recipe=recipe, seed=5, pin_memory=False)
    dm = ShardsDataModule(num_workers=0, **common)
    dm.setup()
    raw = next(iter(dm.train_loader(1, 0)))
    assert raw[0].image.numel() == 0 and all(raw[0].params["jpeg"]) and not any(raw[0].params["decoded"])
    in_process = _batches(dm)
    assert len(set(in_process)) == len(in_process) > 2
    assert _batches(ShardsDataModule(num_workers=2, **common)) == in_process
    worker_decode = ShardsDataModule(num_workers=0, **{**common, "recipe": AugmentRecipe(**DEIT, device=True)})
    assert _batches(worker_decode) != in_process  # another stream: pixels from another decoder and resize


def _run_overrides(pack: Path, teacher_file: Path) -> list[str]:
    return [*(a for a in FAST_DIGITS if not a.startswith(("trainer.limit_train", "trainer.limit_val"))),
            "experiment=quickstart", "data=shards", f"data.root={pack}", "data.num_workers=0",
            "data.pin_memory=false", f"teacher.checkpoint={teacher_file}", "teacher.min_val_top1=0",
            "augment=deit", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "trainer.deterministic=true",
            "trainer.enable_progress_bar=false", "test=false"]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_on_shards_ends_with_the_uninterrupted_weights(tmp_path, digits_pack, digits_teacher_file,
                                                                     monkeypatch):
    overrides = _run_overrides(digits_pack[1], digits_teacher_file)
    train_preempted_then_resumed(overrides, tmp_path, monkeypatch)
    assert _same_weights(_weights(tmp_path / "whole"), _weights(tmp_path / "requeued"))


def test_a_run_decoding_on_the_device_trains_on_a_pack_of_jpegs(tmp_path, digits_jpeg_pack, digits_teacher_file,
                                                               monkeypatch):
    decoded: list[int] = []
    decode = DeviceFinish.decode
    monkeypatch.setattr(DeviceFinish, "decode", lambda self, jpegs, *args: (
        decoded.append(sum(map(bool, jpegs))), decode(self, jpegs, *args))[1])
    overrides = [*_run_overrides(digits_jpeg_pack, digits_teacher_file), "augment.device=true",
                 "augment.device_decode=true", "trainer.max_epochs=1"]
    cfg = compose_config(overrides, tmp_path / "run")
    train(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert len(decoded) >= 3 and set(decoded) == {cfg.data.batch_size}  # every image of every batch, on the device


def test_teacher_cache_on_shards_is_read_back_exactly_also_from_a_moved_pack(tmp_path, digits_pack,
                                                                              digits_teacher_file, teacher_calls):
    cache = [f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.cache_topk=1", "teacher.precision=fp32",
             "teacher.cache_verify_every=0"]
    pack = digits_pack[1]
    train(compose_config([*_run_overrides(pack, digits_teacher_file), *cache], tmp_path / "write"))
    written = teacher_calls()
    assert written == 6  # 2 epochs x 3 steps, all computed and stored
    moved = tmp_path / "moved-pack"
    shutil.copytree(pack, moved)
    train(compose_config([*_run_overrides(moved, digits_teacher_file), *cache], tmp_path / "read"))
    assert teacher_calls() == written + 1  # read from the cache: only the first read step runs the teacher (drift guard)
    assert _same_weights(_weights(tmp_path / "write"), _weights(tmp_path / "read"))
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    fingerprint = json.loads((entry / "fingerprint.json").read_text())
    assert fingerprint["source"] == json.loads((pack / "pack.json").read_text())["digest"]
    assert "root" not in fingerprint["data"]


# ---- bad input: one line, before training -------------------------------------------------------------------
def _error(overrides: list[str], tmp_path: Path) -> str:
    with pytest.raises(Exception) as caught:  # Hydra's instantiate wraps what the data module raised
        train(compose_config(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    error = find_config_error(caught.value)
    assert error is not None and len(str(error).splitlines()) == 1, caught.value
    return str(error)


def test_bad_packs_are_one_line_before_training(tmp_path, digits_pack, digits_teacher_file):
    folder, pack = digits_pack
    base = [o for o in _run_overrides(pack, digits_teacher_file) if not o.startswith("data.root=")]
    assert "data.root is not set" in _error(base, tmp_path)
    assert "is not a folder" in _error([*base, f"data.root={tmp_path / 'nowhere'}"], tmp_path)
    assert "is not a pack" in _error([*base, f"data.root={folder}"], tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(pack, partial)
    (partial / "pack.json").unlink()  # what an interrupted pack command leaves
    assert "partial pack" in _error([*base, f"data.root={partial}"], tmp_path)
    truncated = tmp_path / "truncated"
    shutil.copytree(pack, truncated)
    chunk = sorted((truncated / "train").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-10])
    assert f"shard train/{chunk.name} has" in _error([*base, f"data.root={truncated}"], tmp_path)


def test_damaged_image_bytes_in_a_shard_stop_with_the_item_or_are_skipped(tmp_path, digits_pack):
    pack = tmp_path / "damaged"
    shutil.copytree(digits_pack[1], pack)
    dm = ShardsDataModule(root=str(pack), num_workers=0)
    dm.setup()
    item = dm.train_set.read(0)
    chunk = sorted((pack / "train").glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    start = bytes(data).index(item["image"])
    data[start:start + len(item["image"])] = bytes(len(item["image"]))  # same size: only decoding can tell
    chunk.write_bytes(bytes(data))
    dm = ShardsDataModule(root=str(pack), num_workers=0, image_size=16)
    dm.setup()
    with pytest.raises(CorruptImageError, match=r"damaged/train\[0\] \(train/digit0/000.png\)"):
        dm.train_set[0]
    tolerant = ShardsDataModule(root=str(pack), num_workers=0, image_size=16, skip_corrupt=True)
    tolerant.setup()
    image, label = tolerant.train_set[0]  # the next readable item, with its own label
    assert label == dm.train_set.targets[1] and tolerant.skipped_corrupt == 1


def test_a_source_file_that_cannot_be_read_is_packed_as_unreadable_not_a_hang(tmp_path, digits_pack, monkeypatch):
    from deit_train.data.pack import FolderSplit

    original = FolderSplit.encoded

    def denied(self, index):  # runs in the forked packing worker
        if self.name(index) == "train/digit0/003.png":
            raise PermissionError(13, "Permission denied")
        return original(self, index)

    monkeypatch.setattr(FolderSplit, "encoded", denied)
    meta = pack_folder(digits_pack[0], tmp_path / "pack", workers=1)
    assert meta["splits"]["train"]["kinds"]["unreadable"] == 1
    assert meta["splits"]["train"]["unreadable_examples"] == ["train/digit0/003.png"]
    dm = ShardsDataModule(root=str(tmp_path / "pack"), num_workers=0)
    dm.setup()
    with pytest.raises(CorruptImageError, match=r"train\[3\] \(train/digit0/003.png\)"):
        dm.train_set[3]


def _pack_command(args: list[str], capsys) -> tuple[int, str, str]:
    """``python -m deit_train.pack <args>`` in this process: (exit status, stdout, stderr)."""
    from deit_train.pack import main

    capsys.readouterr()
    try:
        main([*args, "progress=false"])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_pack_command_resumes_and_refuses_another_source_in_one_line(tmp_path, digits_pack, capsys):
    folder, pack = digits_pack
    expected = json.loads((pack / "pack.json").read_text())
    out = tmp_path / "pack"
    shutil.copytree(pack, out)
    (out / "pack.json").unlink()
    shutil.rmtree(out / "val")  # interrupted after the train split
    train_files = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    status, stdout, stderr = _pack_command([f"data.root={folder}", f"out={out}", "pack.workers=1"], capsys)
    assert status == 0, stderr
    assert f"train with: data=shards data.root={out}" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == train_files  # not written again
    assert json.loads((out / "pack.json").read_text())["digest"] == expected["digest"]
    other = _digits_folder(tmp_path / "other", {"train": 2, "val": 1})
    for args, message in (([f"data.root={other}", f"out={out}"], f"out={out} holds a pack of another source"),
                          ([f"data.root={folder}", f"out={folder}"], "is not empty and holds no pack"),
                          ([f"data.root={folder}"], "out is not set"),
                          ([f"data.root={folder}", f"out={out}", "outt=1"], "not an option of the pack command")):
        status, stdout, stderr = _pack_command(args, capsys)
        assert status == 2 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
        assert message in stderr


def test_a_teacher_of_other_classes_than_the_pack_stops_the_teacher_only_pass(tmp_path, digits_pack):
    from dataclasses import asdict

    import timm

    from deit_train.teacher.identity import IDENTITY_KEY, TeacherIdentity
    from deit_train.teacher_cache import fill_cache

    teacher = tmp_path / "letters_teacher.pth"
    torch.save({"state_dict": timm.create_model("regnetx_002", num_classes=10).state_dict(),
                IDENTITY_KEY: asdict(TeacherIdentity(class_names=[f"letter{c}" for c in "abcdefghij"]))}, teacher)
    cfg = compose_config([*_run_overrides(digits_pack[1], teacher), f"teacher.cache_dir={tmp_path / 'cache'}"],
                         tmp_path / "run")
    with pytest.raises(ConfigError, match="the teacher knows other classes than the data"):
        fill_cache(cfg, progress=False)
    assert not (tmp_path / "cache").exists()


def test_hf_dataset_packs_with_its_class_names_and_gives_the_same_stream(tmp_path, digits_pack):
    import datasets

    from deit_train.data import HFDataModule
    from deit_train.pack import compose_pack_config, pack

    folder = digits_pack[0]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("ABCDEFGHIJ"))})
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = _files(folder, split)
        splits[name] = datasets.Dataset.from_dict(
            {"image": [str(p) for p, _ in files], "label": [label for _, label in files]}, features=features)
    saved = tmp_path / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    meta = pack(compose_pack_config(["data=hf", f"data.path={saved}", f"out={tmp_path / 'pack'}", "pack.workers=2",
                                     "progress=false"]))
    assert meta["classes"] == list("ABCDEFGHIJ") and meta["source"]["kind"] == "hf"
    stored = ShardsDataModule(root=str(tmp_path / "pack"), num_workers=0)
    stored.setup()
    raw = datasets.load_from_disk(str(saved))["train"].cast_column("image", datasets.Image(decode=False))
    assert [stored.train_set.read(i)["image"] for i in range(len(raw))] == [row["image"]["bytes"] for row in raw]
    common = dict(image_size=16, batch_size=8, recipe=AugmentRecipe(**DEIT), seed=5, pin_memory=False, num_workers=0)
    assert _batches(ShardsDataModule(root=str(tmp_path / "pack"), **common)) == _batches(
        HFDataModule(path=str(saved), **common))
