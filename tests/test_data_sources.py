"""Data sources on files the tests write: image modes -> RGB, corrupt-file policy, folders, HF datasets, CIFAR, fake."""
from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from conftest import compose_config
from deit_train.data import AugmentRecipe, CifarDataModule, FakeDataModule, HFDataModule, ImageFolderDataModule
from deit_train.data.hf import HFImageStream
from deit_train.data.images import CorruptImageError, load_rgb
from deit_train.errors import ConfigError

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}  # sorted names = label order
NO_AUG = AugmentRecipe(name="none", train_crop="none")
SIZE = 16


def solid(colour, size=(20, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


def write_truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def colour_class(image: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> int:
    """Label of a normalised solid-colour image: index of its brightest channel, in COLOURS' sorted order."""
    rgb = image.mean(dim=(1, 2)) * torch.tensor(std) + torch.tensor(mean)
    channel = int(rgb.argmax())  # 0 red, 1 green, 2 blue
    return {0: 2, 1: 1, 2: 0}[channel]


# ---- every mode becomes RGB ---------------------------------------------------------------------------
def test_modes_become_rgb_with_the_right_pixels(tmp_path):
    grey = Image.new("L", (5, 4), 100)
    grey.save(tmp_path / "l.png")
    sixteen = Image.fromarray(np.array([[0, 32896], [65535, 257]], dtype=np.uint16))  # -> 0, 128, 255, 1
    sixteen.save(tmp_path / "i16.png")
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 255))  # opaque: kept
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # transparent: white
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (1, 1), (0, 0))
    la.save(tmp_path / "la.png")
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)

    opened = {p.name: Image.open(p).mode for p in tmp_path.iterdir()}
    assert opened["i16.png"].startswith("I") and opened["cmyk.jpg"] == "CMYK" and opened["p.png"] == "P"
    images = {p.name: load_rgb(p) for p in tmp_path.iterdir()}
    assert all(im.mode == "RGB" for im in images.values())
    assert images["l.png"].getpixel((4, 3)) == (100, 100, 100)
    assert [images["i16.png"].getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 1]
    assert images["rgba.png"].getpixel((0, 0)) == (10, 20, 30)
    assert images["rgba.png"].getpixel((1, 0)) == (255, 255, 255)
    assert images["la.png"].getpixel((0, 0)) == (255, 255, 255)
    assert images["p.png"].getpixel((1, 1)) == (200, 100, 50) and images["p.png"].getpixel((0, 0)) == (0, 0, 0)
    red = np.asarray(images["cmyk.jpg"], dtype=int)
    assert np.abs(red - [255, 0, 0]).max() <= 8


def test_truncated_jpeg_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    write_truncated_jpeg(bad)
    with pytest.raises(CorruptImageError) as info:
        load_rgb(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "data.skip_corrupt=true" in message


# ---- ImageNet-layout folders -----------------------------------------------------------------------
@pytest.fixture
def image_tree(tmp_path) -> Path:
    """root/{train,val}/{blue,green,red}/ with solid-colour images in several formats and modes."""
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in COLOURS.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                solid(colour).save(folder / f"{i}.jpg")
            solid(colour).convert("RGBA").save(folder / "alpha.png")
            solid(colour).convert("P").save(folder / "palette.png")
    (tmp_path / "train" / "README.txt").write_text("not a class folder")
    return tmp_path


def test_imagefolder_classes_count_and_batches(image_tree):
    dm = ImageFolderDataModule(root=str(image_tree), image_size=SIZE, batch_size=4, num_workers=0,
                               pin_memory=False, recipe=AugmentRecipe(name="simple", hflip=0.5))
    assert dm.classes == ["blue", "green", "red"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 12
    images, labels = dm.batch_to_device(next(iter(dm.train_dataloader())), "cpu")  # as a training step sees it
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32 and labels.dtype == torch.int64
    for image, label in dm.val_set:  # eval transform keeps the colour: label and pixels agree
        assert colour_class(image) == label


def test_imagefolder_errors_name_the_option(image_tree, tmp_path):
    with pytest.raises(ConfigError, match="data.root is not set"):
        ImageFolderDataModule(root=None)
    (image_tree / "val").rename(image_tree / "valid")
    with pytest.raises(ConfigError, match="has no val/ folder"):
        ImageFolderDataModule(root=str(image_tree))
    with pytest.raises(ConfigError, match="data.num_classes=5 but .* has 3 class folders"):
        ImageFolderDataModule(root=str(image_tree), num_classes=5, val_split="valid")


def test_corrupt_file_stops_the_run_by_default_even_in_a_worker(image_tree):
    bad = image_tree / "train" / "green" / "zz_truncated.jpg"
    write_truncated_jpeg(bad)
    dm = ImageFolderDataModule(root=str(image_tree), image_size=SIZE, batch_size=32, num_workers=1,
                               pin_memory=False, recipe=NO_AUG)
    dm.setup("fit")
    loader = DataLoader(dm.train_set, batch_size=32, num_workers=1)
    with pytest.raises(CorruptImageError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot decode image") and str(bad) in message


def test_skip_corrupt_skips_counts_and_keeps_labels_right(image_tree, caplog):
    bad = image_tree / "train" / "green" / "zz_truncated.jpg"
    write_truncated_jpeg(bad)
    dm = ImageFolderDataModule(root=str(image_tree), image_size=SIZE, batch_size=4, num_workers=0,
                               pin_memory=False, recipe=NO_AUG, skip_corrupt=True)
    dm.setup("fit")
    paths = [p for p, _ in dm.train_set.samples]
    bad_index = paths.index(str(bad))
    assert dm.skipped_corrupt == 0
    items = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert dm.skipped_corrupt == 1
    assert all(colour_class(image) == label for image, label in items)
    # the corrupt slot is served by the next file (a red image, label red), never with green's label
    assert items[bad_index][1] == dm.classes.index("red")
    dm.teardown("fit")
    assert f"skipped corrupt image {bad}" in caplog.text and "skipped 1 corrupt image(s)" in caplog.text
    dm.train_set.transform = lambda image: image  # wrappers (SimMIM) swap the transform of the real dataset
    assert isinstance(dm.train_set[0][0], Image.Image)


# ---- HuggingFace datasets ----------------------------------------------------------------------------
def colour_dataset(n_per_class: int) -> datasets.Dataset:
    names = list(COLOURS)
    images, labels = [], []
    for label, name in enumerate(names):
        for _ in range(n_per_class):
            images.append(solid(COLOURS[name]).convert("RGBA") if label == 1 else solid(COLOURS[name]))
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_hf_load_from_disk_with_classlabel_names(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": colour_dataset(4), "validation": colour_dataset(2)}).save_to_disk(str(saved))
    dm = HFDataModule(path=str(saved), image_size=SIZE, batch_size=4, num_workers=0, pin_memory=False,
                      recipe=AugmentRecipe(name="deit", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    assert dm.classes == ["blue", "green", "red"] and dm.num_classes == 3
    dm.setup("fit")
    images, labels = dm.batch_to_device(next(iter(dm.train_dataloader())), "cpu")  # as a training step sees it
    assert images.shape == (4, 3, SIZE, SIZE) and labels.dtype == torch.int64
    assert [colour_class(img) for img, _ in dm.val_set] == [label for _, label in dm.val_set]
    with pytest.raises(ConfigError, match="data.num_classes=7 but column 'label' has 3 classes"):
        HFDataModule(path=str(saved), num_classes=7)
    with pytest.raises(ConfigError, match="no column 'img'"):
        HFDataModule(path=str(saved), image_column="img")


def test_hf_parquet_files_with_custom_columns(tmp_path):
    (tmp_path / "pq").mkdir()
    for split, n in (("train", 3), ("validation", 1)):
        ds = colour_dataset(n).rename_columns({"image": "img", "label": "fine_label"})
        ds = ds.cast_column("fine_label", datasets.Value("int64"))  # plain ints: no ClassLabel names
        ds.to_parquet(str(tmp_path / "pq" / f"{split}.parquet"))
    dm = HFDataModule(path="parquet", data_files={"train": str(tmp_path / "pq" / "train.parquet"),
                                                  "validation": str(tmp_path / "pq" / "validation.parquet")},
                      cache_dir=str(tmp_path / "hf_cache"), image_column="img", label_column="fine_label", image_size=SIZE, num_workers=0,
                      pin_memory=False, recipe=NO_AUG)
    assert dm.num_classes == 3 and dm.classes == ["0", "1", "2"]  # counted from the labels
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.test_set) == 3
    assert all(colour_class(img) == label for img, label in dm.train_set)


def indexed_stream(n: int, shards: int) -> datasets.IterableDataset:
    """Images whose label is their index: what each rank/worker got is readable from the labels."""
    ds = datasets.Dataset.from_dict({"image": [solid((i, 0, 0), (4, 4)) for i in range(n)], "label": list(range(n))},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    return ds.to_iterable_dataset(num_shards=shards)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_hf_stream_is_sharded_per_rank_and_worker(num_workers):
    seen = []
    for rank in range(2):
        stream = HFImageStream(indexed_stream(16, shards=4), "image", "label", transform=None, split="train",
                               rank=rank, world_size=2, shuffle_buffer=4, seed=3, length=8)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=lambda x: x)
        labels = [label for _, label in loader]
        assert len(labels) == 8 and len(set(labels)) == 8
        seen.append(set(labels))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(16))


def test_hf_stream_reshuffles_every_epoch_and_skips_corrupt_rows():
    stream = HFImageStream(indexed_stream(16, shards=4), "image", "label", transform=None, split="train",
                           shuffle_buffer=8, seed=0)
    first, second = [lbl for _, lbl in stream], [lbl for _, lbl in stream]
    assert sorted(first) == sorted(second) == list(range(16)) and first != second

    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": "x.jpg"},
                                                   {"bytes": None, "path": None}], "label": [0, 1]})
    rows = datasets.Dataset.from_dict({"image": [{"bytes": _png_bytes((1, 2, 3)), "path": "ok.png"}], "label": [2]})
    mixed = datasets.concatenate_datasets([broken, rows]).to_iterable_dataset()
    tolerant = HFImageStream(mixed, "image", "label", transform=None, split="train", skip_corrupt=True)
    assert [(img.getpixel((0, 0)), lbl) for img, lbl in tolerant] == [((1, 2, 3), 2)] and tolerant.skipped == 2
    with pytest.raises(CorruptImageError, match="x.jpg"):
        list(HFImageStream(mixed, "image", "label", transform=None, split="train"))


def _png_bytes(colour) -> bytes:
    import io

    buffer = io.BytesIO()
    solid(colour, (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hf_streaming_module_needs_a_length_and_gives_batches(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": colour_dataset(4), "validation": colour_dataset(1)}).save_to_disk(str(saved))
    dm = HFDataModule(path=str(saved), streaming=True, image_size=SIZE, batch_size=4, num_workers=0,
                      pin_memory=False, recipe=NO_AUG, train_samples=12)
    assert dm.num_classes == 3
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(dm.train_dataloader()) == 3 and [b[0].shape for b in batches] == [(4, 3, SIZE, SIZE)] * 3
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


# ---- CIFAR pickles, fake data ------------------------------------------------------------------------
def write_cifar10(root: Path, per_batch: int = 2) -> np.ndarray:
    """The python CIFAR-10 layout; image k of every batch is filled with value k*10 in R, +1 in G, +2 in B."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    planes = np.stack([np.full((3, 32 * 32), 0, np.uint8) + np.array([[k * 10], [k * 10 + 1], [k * 10 + 2]],
                                                                       dtype=np.uint8) for k in range(per_batch)])
    rows = planes.reshape(per_batch, 3 * 32 * 32)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (folder / name).open("wb") as f:
            pickle.dump({"data": rows, "labels": list(range(per_batch))}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return rows


def test_cifar10_pickles_are_read_channel_last_and_upscaled(tmp_path):
    write_cifar10(tmp_path)
    dm = CifarDataModule(root=str(tmp_path), num_classes=10, image_size=48, batch_size=2, num_workers=0,
                         pin_memory=False, recipe=NO_AUG)
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.test_set) == 2 and dm.classes[:2] == ["c0", "c1"]
    assert dm.train_set.images[1, 5, 7].tolist() == [10, 11, 12]  # R, G, B planes -> HWC
    image, label = dm.val_set[1]
    assert image.shape == (3, 48, 48) and label == 1
    with pytest.raises(ConfigError, match="no cifar-100-python/ folder"):
        CifarDataModule(root=str(tmp_path), num_classes=100)


def test_fake_data_is_fixed_per_index():
    dm = FakeDataModule(num_classes=5, num_train=6, num_val=2, source_size=(40, 30), image_size=SIZE,
                        num_workers=0, recipe=NO_AUG)
    dm.setup("fit")
    a, b = dm.train_set[3], dm.train_set[3]
    assert a[0].shape == (3, SIZE, SIZE) and torch.equal(a[0], b[0]) and a[1] == b[1] and 0 <= a[1] < 5
    assert not torch.equal(dm.val_set[0][0], dm.train_set[0][0])


# ---- the data configs instantiate with the augment group's recipe ---------------------------------------
def test_data_configs_take_the_recipe(image_tree, tmp_path):
    write_cifar10(tmp_path / "cifar")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": colour_dataset(2), "validation": colour_dataset(1)}).save_to_disk(str(saved))
    cases = {"imagefolder": [f"data.root={image_tree}"], "cifar10": [f"data.root={tmp_path / 'cifar'}"],
             "hf": [f"data.path={saved}"], "fake": ["data.num_classes=7"]}
    for source, overrides in cases.items():
        cfg = compose_config([f"data={source}", "augment=three_augment", "model=deit_tiny", *overrides], tmp_path)
        dm = instantiate(cfg.data)
        assert dm.recipe.name == "three_augment" and dm.image_size == 224, source
        assert dm.num_classes == {"imagefolder": 3, "cifar10": 10, "hf": 3, "fake": 7}[source]


# ---- data.train_fraction on every source ------------------------------------------------------------------
def _labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_every_source_keeps_the_same_balanced_training_subset(image_tree, tmp_path):
    """Each class keeps round(fraction x its count) training images, drawn by split_seed; val and test stay whole."""
    write_cifar10(tmp_path / "cifar", per_batch=4)  # labels 0..3, 5 images each
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": colour_dataset(5), "validation": colour_dataset(2)}).save_to_disk(str(saved))
    common = dict(image_size=SIZE, num_workers=0, pin_memory=False, recipe=NO_AUG)
    sources = {
        "imagefolder": lambda **kw: ImageFolderDataModule(root=str(image_tree), **common, **kw),  # 5 per class
        "cifar": lambda **kw: CifarDataModule(root=str(tmp_path / "cifar"), num_classes=10, **common, **kw),
        "hf": lambda **kw: HFDataModule(path=str(saved), **common, **kw),  # 5 per class
        "fake": lambda **kw: FakeDataModule(num_classes=3, num_train=30, num_val=4, source_size=(20, 20), **common,
                                            **kw),  # random labels
    }
    for name, make in sources.items():
        whole, part = make(), make(train_fraction=0.4)
        whole.setup("fit"), part.setup("fit")
        counts = Counter(_labels(whole.train_set))
        assert Counter(_labels(part.train_set)) == {c: max(1, round(0.4 * n)) for c, n in counts.items()}, name
        assert len(part.val_set) == len(whole.val_set) and len(part.test_set) == len(whole.test_set), name
        again, other = make(train_fraction=0.4), make(train_fraction=0.4, split_seed=1)
        again.setup("fit"), other.setup("fit")
        assert again.train_set.indices == part.train_set.indices != other.train_set.indices, name
        # a kept item is the whole set's item of that index: images and labels, not only counts
        first = part.train_set.indices[0]
        assert torch.equal(part.train_set[0][0], whole.train_set[first][0]), name
    with pytest.raises(ConfigError, match=r"^data.train_fraction=0.5 needs the whole label column"):
        HFDataModule(path=str(saved), streaming=True, train_samples=15, train_fraction=0.5)
    with pytest.raises(ConfigError, match=r"^data.train_fraction=0 must lie in \(0, 1\]"):
        ImageFolderDataModule(root=str(image_tree), train_fraction=0)
