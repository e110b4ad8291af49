"""uint8 workers and RandAugment on the device (deit_train.data.device_augment).

- uint8 workers: batches BIT-IDENTICAL to the CPU path (normalisation in float32 is IEEE-exact; erasing's noise is
  regenerated from the worker's generator state by timm's own _get_pixels).
- device RandAugment: the same crops, flips, ops and magnitudes as the CPU path for 1,000 seeds; pixels BOUNDED:
  colour/LUT ops within 1 grey level of timm's PIL ops, geometric ops (bilinear tensor kernels against PIL bicubic)
  within a mean of 3 levels on photo-like crops (measured 1.2-2.6).
- device decode (augment.device_decode): the same draws again (erasing boxes included) for 1,000 seeds; 224 px
  crops within 2 grey levels of the worker-decode path where that decodes at full scale (the CPU path's own crop
  there: PIL's bicubic resize against torchvision's antialiased one; measured max 2, mean 0.004), within a mean of
  1.5 where it decodes at a reduced DCT scale (measured 0.98, max 10); the deit recipe's finished batch within a
  mean of 1 level (measured 0.19: threshold ops such as Solarize turn a one-level difference into a large one).
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F1
from PIL import Image
from timm.data import random_erasing
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import default_collate

from conftest import compose_config
from deit_train.data.device_augment import DeviceImages, apply_op
from deit_train.data.fake import FakeDataModule
from deit_train.data.images import CorruptImageError, EncodedImage, load_rgb
from deit_train.data.recipes import AugmentRecipe, _posterize_keeping_zero_bits
from deit_train.data.stream import seed_globals
from deit_train.errors import ConfigError
from deit_train.teacher.cache import fingerprint_digest, run_fingerprint

DEIT = dict(name="deit", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, re_prob=0.25)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batches(uint8: bool, workers: int = 0, **recipe):
    dm = FakeDataModule(num_classes=5, num_train=48, num_val=8, source_size=(40, 56), image_size=32, batch_size=16,
                        num_workers=workers, recipe=AugmentRecipe(**{**DEIT, **recipe}), uint8_workers=uint8)
    dm.setup("fit")
    return [dm.batch_to_device(batch, "cpu") for batch in dm.train_loader(2, 1)]


@pytest.mark.parametrize("erasing", [dict(re_prob=0.6), dict(re_prob=0.6, re_mode="rand", re_count=3),
                                     dict(re_prob=0.6, re_mode="const", re_count=2)])
def test_uint8_workers_give_the_cpu_paths_batches_bit_for_bit(erasing):
    cpu, uint8 = _batches(False, **erasing), _batches(True, **erasing)
    assert len(cpu) == len(uint8) == 1
    for (a, ya), (b, yb) in zip(cpu, uint8):
        assert b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ya, yb)


def _cuda_division(monkeypatch) -> None:
    """Tensor division by a host scalar as CUDA does it (ATen's BinaryDivTrueKernel.cu: a CPU scalar divisor becomes a
    multiplication by its float32 reciprocal), on CPU tensors."""
    def emulated(original):
        def divide(self, other, *args, **kwargs):
            if isinstance(other, (int, float)) and self.is_floating_point() and not args and not kwargs:
                reciprocal = float(np.float32(1) / np.float32(other))  # exactly representable in float32
                return (self.mul_ if original.__name__.endswith("_") else self.mul)(reciprocal)
            return original(self, other, *args, **kwargs)
        return divide

    for name in ("div", "div_", "__truediv__", "__itruediv__"):
        monkeypatch.setattr(torch.Tensor, name, emulated(getattr(torch.Tensor, name)))


def test_uint8_workers_give_the_cpu_paths_bits_also_where_division_is_cudas(monkeypatch):
    """The device stage normalises by looking each byte up in a table computed on the host with the worker path's
    own arithmetic: no division runs on the device, so CUDA's reciprocal multiplication (1 ulp off for 126 of the
    256 byte values of /255) cannot reach the batch."""
    values = torch.arange(256, dtype=torch.float32)
    exact = values.div(255)
    cpu = _batches(False, re_prob=0.6)
    dm = FakeDataModule(num_classes=5, num_train=48, num_val=8, source_size=(40, 56), image_size=32, batch_size=16,
                        num_workers=0, recipe=AugmentRecipe(**{**DEIT, "re_prob": 0.6}))
    dm.setup("fit")
    raw = list(dm.train_loader(2, 1))
    with monkeypatch.context() as patched:
        _cuda_division(patched)
        assert int((values.div(255) != exact).sum()) == 126  # the emulation is CUDA's: 126 bytes 1 ulp off
        uint8 = [dm.batch_to_device(batch, "cpu") for batch in raw]
    assert len(cpu) == len(uint8) == 1
    for (a, ya), (b, yb) in zip(cpu, uint8):
        assert b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ya, yb)


def test_uint8_workers_ship_uint8_and_draws_the_same_with_worker_processes():
    dm = FakeDataModule(num_classes=5, num_train=32, num_val=8, source_size=(40, 56), image_size=32, batch_size=16,
                        num_workers=2, recipe=AugmentRecipe(**DEIT))
    dm.setup("fit")
    raw = next(iter(dm.train_loader(1, 0)))
    assert isinstance(raw[0], DeviceImages) and raw[0].image.dtype == torch.uint8
    dm.num_workers = 0
    in_process = next(iter(dm.train_loader(1, 0)))
    assert torch.equal(dm.batch_to_device(raw, "cpu")[0], dm.batch_to_device(in_process, "cpu")[0])


def _recorded_cpu_path(monkeypatch) -> list:
    """Instrument today's CPU path: what its crop, flip and RandAugment ops were called with."""
    log: list = []
    get_params = RandomResizedCropAndInterpolation.get_params

    def crop_params(img, scale, ratio):
        params = get_params(img, scale, ratio)
        log.append(("crop", tuple(params)))
        return params

    monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(crop_params))
    hflip = F1.hflip
    monkeypatch.setattr(F1, "hflip", lambda img: (log.append(("flip",)), hflip(img))[1])
    call = AugmentOp.__call__

    def op_call(self, img):
        original = self.aug_fn

        def recording(image, *args, **kwargs):
            log.append(("op", self.name, float(args[0]) if args else 0.0))
            return original(image, *args, **kwargs)

        self.aug_fn = recording
        try:
            return call(self, img)
        finally:
            self.aug_fn = original

    monkeypatch.setattr(AugmentOp, "__call__", op_call)

    def erasing_pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
        return torch.full(patch_size, float("nan"), dtype=dtype)  # marks the box; drawn after the box, as the noise

    monkeypatch.setattr(random_erasing, "_get_pixels", erasing_pixels)
    return log


def _erased_box(image: torch.Tensor) -> tuple:
    """(top, left, height, width) of the NaN box the instrumented CPU path's erasing wrote, or ()."""
    rows, cols = np.flatnonzero(image.isnan().any(0).any(1)), np.flatnonzero(image.isnan().any(0).any(0))
    return (int(rows[0]), int(cols[0]), len(rows), len(cols)) if len(rows) else ()


def _jpeg(rng, w: int, h: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_device_paths_draw_the_cpu_paths_crops_flips_ops_magnitudes_and_erasing_for_1000_seeds(monkeypatch):
    rng = np.random.default_rng(0)
    # sizes around the output and far above it (reduced-DCT decode on the worker-decode device path); greyscale
    # JPEGs decode on the device too, CMYK ones and PNGs in the worker
    photos = [_jpeg(rng, *[(40, 30), (64, 48), (200, 150), (150, 260)][k % 4]) for k in range(8)]
    photos += [_jpeg(rng, 90, 70, "L"), _jpeg(rng, 60, 80, "CMYK")]
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(png, "PNG")
    photos.append(png.getvalue())
    recipe = dict(DEIT, re_prob=0.5)  # more erased samples to compare
    cpu = AugmentRecipe(**recipe).train_transform(24, MEAN, STD)
    paths = {"worker decode": AugmentRecipe(**recipe, device=True).worker_transform(24, MEAN, STD),
             "device decode": AugmentRecipe(**recipe, device=True, device_decode=True).worker_transform(24, MEAN, STD)}
    names = paths["worker decode"].randaugment.names
    log = _recorded_cpu_path(monkeypatch)
    reduced = erased = on_device = 0
    for seed in range(1000):
        photo = photos[seed % len(photos)]
        log.clear()
        seed_globals(seed, cpu_only=True)
        box = _erased_box(cpu(load_rgb(photo)))
        cpu_draws = list(log) + [("erase", box)] * bool(box)
        for name, device in paths.items():
            seed_globals(seed, cpu_only=True)
            params = device(EncodedImage(photo)).params
            recorded = [("crop", tuple(params["crop"].tolist()))] + [("flip",)] * bool(params["flip"])
            recorded += [("op", names[i], a) for i, a in zip(params["ra_ops"].tolist(), params["ra_args"].tolist())
                         if i >= 0]
            recorded += [("erase", tuple(b)) for b in params["erase_boxes"].tolist() if b[2]]
            assert recorded == cpu_draws, (seed, name)
        reduced += int(paths["worker decode"](EncodedImage(photo)).params["reduction"]) > 1
        erased += bool(box)
        on_device += bool(params["jpeg"])
        assert bool(params["jpeg"]) == (seed % len(photos) < 9)  # RGB and greyscale JPEGs: bytes; the others: a crop
    assert reduced > 100  # the header-first draws held while JPEGs decoded at reduced scales
    assert erased > 300 and on_device > 700


def test_without_reduction_the_device_paths_worker_crop_is_the_cpu_paths():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    crop_flip = AugmentRecipe(**DEIT).worker_transform(24, MEAN, STD).crop.transforms[:2]  # timm RRC + flip
    device = AugmentRecipe(**DEIT, device=True).worker_transform(24, MEAN, STD).crop
    for seed in range(50):
        seed_globals(seed, cpu_only=True)
        expected = image
        for step in crop_flip:
            expected = step(expected)
        seed_globals(seed, cpu_only=True)
        assert np.array_equal(np.asarray(device(image)[0]), np.asarray(expected))


def _photo(rng, size: int = 96) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([127 + 100 * np.sin(xx / (9 + 7 * c) + yy / (13 + 5 * c) + phase[c]) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_device_kernels_stay_within_resampling_arithmetic_of_timms_pil_ops():
    rng = np.random.default_rng(2)
    fill = (124, 116, 104)
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": fill, "interpolation": Image.BICUBIC})
    photos = [_photo(rng) for _ in range(6)]
    for op in ra.ops:
        for k, photo in enumerate(photos):
            random.seed(k)
            level = op.level_fn(min(10.0, max(0.0, random.gauss(9, 0.5))), op.hparams) if op.level_fn else ()
            pil_op = _posterize_keeping_zero_bits if op.name == "PosterizeIncreasing" else op.aug_fn
            expected = F1.pil_to_tensor(pil_op(photo, *level, **op.kwargs)).int()
            got = apply_op(op.name, F1.pil_to_tensor(photo), float(level[0]) if level else 0.0, fill).int()
            diff = (expected - got).abs().float()
            if op.name in GEOMETRIC:
                assert diff.mean() <= 3.0, (op.name, diff.mean())
            else:
                assert diff.max() <= 1, (op.name, diff.max())


@pytest.mark.parametrize("policy, named", [("rand-m9-mstd0.5-t3a", "Desaturate, GaussianBlur"),
                                           ("3a", "rand-"), ("augmix-m5", "rand-")])
def test_unsupported_device_recipes_stop_with_one_line(policy, named):
    with pytest.raises(ConfigError, match=named) as error:
        AugmentRecipe(name="x", auto_augment=policy, device=True)
    assert "\n" not in str(error.value) and "augment.device" in str(error.value)
    with pytest.raises(ConfigError, match="train_crop=rrc"):
        AugmentRecipe(name="x", train_crop="src", device=True)
    with pytest.raises(ConfigError, match="uint8_workers"):
        FakeDataModule(recipe=AugmentRecipe(**DEIT, device=True), uint8_workers=False)


def test_teacher_cache_keys_the_device_path_apart_and_keeps_the_cpu_paths_key(tmp_path):
    base = ["data=fake", "augment=deit", "teacher=regnetx_002_digits", "distill=soft"]
    teacher = torch.nn.Linear(2, 2)
    teacher.fingerprint = lambda: {"teacher": "t"}
    dm = FakeDataModule(num_classes=5, num_train=8)

    def fingerprint(*overrides):
        return run_fingerprint(compose_config([*base, *overrides], tmp_path), dm, teacher, 1, 5, "float16")

    cpu, uint8_off, device = fingerprint(), fingerprint("data.uint8_workers=false"), fingerprint("augment.device=true")
    decode = fingerprint("augment.device=true", "augment.device_decode=true")
    assert "device" not in cpu["augment"] and "device_augment" not in cpu
    assert "device_decode" not in cpu["augment"] and "device_decode" not in device["augment"]
    assert "decode" not in device["device_augment"] and "libjpeg-turbo" in decode["device_augment"]["decode"]
    assert len({fingerprint_digest(cpu), fingerprint_digest(device), fingerprint_digest(decode)}) == 3
    assert fingerprint_digest(cpu) == fingerprint_digest(uint8_off)  # the exact uint8 path is the same stream
    assert device["device_augment"]["device"] == "cpu"
    assert set(device["device_augment"]) == {"backend", "torch", "torchvision", "device"}
    assert fingerprint_digest(device) != fingerprint_digest(cpu)


def test_training_steps_see_the_cpu_paths_batches_and_the_device_path_trains(tmp_path, monkeypatch):
    from test_stream import FAKE, TINY_STUDENT, _digest
    from timm.data import Mixup

    from deit_train.train import train

    hashes: list = []
    original = Mixup.__call__
    monkeypatch.setattr(Mixup, "__call__", lambda self, x, y: (lambda out: (hashes.append(_digest(*out)), out)[1])(
        original(self, x, y)))

    def run(name: str, *overrides) -> list[str]:
        hashes.clear()
        train(compose_config([*FAKE, *TINY_STUDENT, "trainer.max_epochs=1", *overrides], tmp_path / name))
        return list(hashes)

    cpu = run("cpu", "data.uint8_workers=false")
    assert len(cpu) == 3
    assert run("uint8", "data.uint8_workers=true") == cpu
    device = run("device", "augment.device=true")
    assert len(device) == 3 and device != cpu


def _photo_jpeg(rng, w: int, h: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([127 + 100 * np.sin(xx / (20 + 7 * c) + yy / (31 + 5 * c) + phase[c]) for c in range(3)], -1)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                                                 quality=90)
    return buffer.getvalue()


def _finished(recipe: dict, photos: list, seeds, size: int, **device) -> torch.Tensor:
    """The device path's batch in grey levels (0-255, before normalisation) for one seed per photo."""
    worker = AugmentRecipe(**recipe, device=True, **device).worker_transform(size, MEAN, STD)
    samples = []
    for seed, photo in zip(seeds, photos):
        seed_globals(seed, cpu_only=True)
        samples.append(worker(EncodedImage(photo)))
    batch = worker.finish(MEAN, STD)(default_collate(samples))
    return batch * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


def test_device_decode_stays_within_resampling_arithmetic_of_the_worker_decode_path():
    rng = np.random.default_rng(3)
    photos = [_photo_jpeg(rng, *size) for size in [(500, 375), (375, 500), (200, 150), (1400, 1050), (64, 48)] * 8]
    seeds = range(len(photos))
    crop_only = dict(name="simple")
    reductions = []
    for seed, photo in zip(seeds, photos):
        seed_globals(seed, cpu_only=True)
        reductions.append(int(AugmentRecipe(**crop_only, device=True).worker_transform(224, MEAN, STD)(
            EncodedImage(photo)).params["reduction"]))
    full, reduced = np.array(reductions) == 1, np.array(reductions) > 1
    assert full.sum() > 20 and reduced.sum() > 2
    diff = (_finished(crop_only, photos, seeds, 224) - _finished(crop_only, photos, seeds, 224, device_decode=True))
    diff = diff.abs().round()
    assert diff[torch.from_numpy(full)].max() <= 2  # both decoded at full scale: PIL bicubic vs antialiased tensor
    assert diff[torch.from_numpy(full)].mean() <= 0.05
    assert diff[torch.from_numpy(reduced)].mean() <= 1.5  # the worker path decoded at 1/2-1/8 scale
    deit = (_finished(DEIT, photos, seeds, 224) - _finished(DEIT, photos, seeds, 224, device_decode=True)).abs()
    assert deit.mean() <= 1.0


def test_device_decode_names_a_jpeg_the_device_cannot_decode_in_one_line():
    rng = np.random.default_rng(4)
    good = _jpeg(rng, 60, 40)
    bad = bytearray(good)
    bad[bad.index(b"\xff\xc4") + 4] = 0xFF  # a bogus Huffman table index: the header reads, the data does not
    worker = AugmentRecipe(**DEIT, device=True, device_decode=True).worker_transform(24, MEAN, STD)
    samples = [worker(EncodedImage(data, name=name)) for data, name in ((good, "good.jpg"), (bytes(bad), "bad.jpg"))]
    assert all(sample.params["jpeg"] for sample in samples)  # a complete JPEG to the header: shipped as bytes
    with pytest.raises(CorruptImageError) as error:
        worker.finish(MEAN, STD)(default_collate(samples))
    assert str(error.value).startswith("cannot decode image bad.jpg on the device (Bogus DHT index")
    assert "\n" not in str(error.value) and "augment.device_decode=false" in str(error.value)


def test_device_decode_needs_the_device_path_and_image_files():
    with pytest.raises(ConfigError, match="augment.device_decode=true needs augment.device=true") as error:
        AugmentRecipe(**DEIT, device_decode=True)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="FakeDataModule holds decoded images: use augment.device_decode=false"):
        FakeDataModule(recipe=AugmentRecipe(**DEIT, device=True, device_decode=True))


def _counting_transfers_and_reads(monkeypatch) -> dict:
    """Patches what moves a tensor to a device (``Tensor.to`` with a device, ``torch.as_tensor``/``torch.tensor``
    with one) and what reads a tensor back on the host (``item``, ``cpu``, ``tolist``, ``numpy``, truth and number
    values): on CUDA each read is a host sync, each transfer a copy (and, from pageable memory, a wait).
    ``transfers`` counts the device stage's own (called from deit_train), ``kernel_transfers`` those torchvision's
    kernels make inside (a geometric op's matrix, grid scale and fill, Sharpness's kernel: per image)."""
    import inspect

    counts = {"transfers": 0, "kernel_transfers": 0, "reads": 0}

    def count_transfer() -> None:
        caller = inspect.stack(context=0)[2].filename
        counts["transfers" if "/deit_train/" in caller else "kernel_transfers"] += 1

    def is_device(value) -> bool:
        return isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda"))

    to = torch.Tensor.to

    def counted_to(self, *args, **kwargs):
        if any(is_device(a) for a in args) or "device" in kwargs:
            count_transfer()
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted_to)
    for name in ("as_tensor", "tensor"):
        made = getattr(torch, name)
        monkeypatch.setattr(torch, name, (lambda made: lambda *a, **k: (
            count_transfer() if "device" in k else None, made(*a, **k))[1])(made))
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__"):
        read = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, (lambda read: lambda self, *a, **k: (
            counts.__setitem__("reads", counts["reads"] + 1), read(self, *a, **k))[1])(read))
    return counts


@pytest.mark.parametrize("re_mode", ["pixel", "rand"])
def test_the_device_stage_copies_once_per_batch_and_reads_nothing_back(monkeypatch, re_mode):
    """Device RandAugment and random erasing on a batch of 32 where every sample is erased (up to 3 boxes): one
    copy of the RandAugment groups' row indices, one of the erasing noise, no host read of a tensor; the batch is
    the one of the per-sample noise draws (same generator states, same values). (torchvision's geometric and
    Sharpness kernels still make their own small tensors on the device per image: counted, not ours to batch.)"""
    from deit_train.data.device_augment import collate_device_images

    rng = np.random.default_rng(5)
    photos = [_photo(rng, 48) for _ in range(4)]
    recipe = {**DEIT, "re_prob": 1.0, "re_count": 3, "re_mode": re_mode}
    worker = AugmentRecipe(**recipe, device=True).worker_transform(24, MEAN, STD)
    samples = []
    for seed in range(32):
        seed_globals(seed, cpu_only=True)
        samples.append(worker(photos[seed % 4]))
    batch = collate_device_images(samples)
    finish = worker.finish(MEAN, STD)
    expected = finish(batch)  # the first batch also moves the normalisation table to the device, once
    erased = int((batch.params["erase_boxes"][:, :, 2] > 0).sum())
    assert erased >= 40
    with monkeypatch.context() as patched:
        counts = _counting_transfers_and_reads(patched)
        got = finish(batch)
    assert counts["transfers"] == 2 and counts["reads"] == 0, counts
    assert counts["kernel_transfers"] > 0  # the counter sees torchvision's too: it would see ours
    assert torch.equal(got, expected)
    # the noise is timm's, drawn per sample from the worker's generator state: redraw a sample's only box
    boxes = batch.params["erase_boxes"]
    sample = int(np.flatnonzero((boxes[:, 0, 2] > 0) & (boxes[:, 1, 2] == 0))[0])
    top, left, height, width = (int(v) for v in batch.params["erase_boxes"][sample, 0])
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(torch.from_numpy(batch.params["erase_rng"][sample]))
        noise = random_erasing._get_pixels(re_mode == "pixel", re_mode == "rand", (3, height, width), device="cpu")
    assert torch.equal(got[sample, :, top:top + height, left:left + width], noise.expand(3, height, width))


def test_device_decode_on_cuda_is_ordered_after_the_current_stream_and_before_its_next_kernels(monkeypatch):
    """torchvision 0.19-0.29 allocate decode_jpeg's CUDA outputs on the current stream and write them from nvJPEG's
    private stream, which waits on nothing: a block just freed on the training stream (and still read by its
    queued backward) could be overwritten. The device stage calls it with a side stream current (the outputs come
    from the side stream's blocks), after the side stream waited for the current one; the current stream then
    waits for the decode and each output is recorded as used there. The stream API is faked (no GPU here): the
    calls and their order are what this checks; on the CPU the decode is decode_jpeg's own, bit for bit."""
    import contextlib

    from torchvision.io import ImageReadMode, decode_jpeg

    import deit_train.data.device_augment as device_augment
    from deit_train.data.device_augment import DeviceFinish

    calls: list = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: "Stream") -> None:
            calls.append(("wait", self.name, other.name))

    current = {"stream": Stream("training")}
    made: list = []

    @contextlib.contextmanager
    def stream(side: Stream):
        previous, current["stream"] = current["stream"], side
        try:
            yield
        finally:
            current["stream"] = previous

    class Decoded:
        def record_stream(self, used_on: Stream) -> None:
            calls.append(("record", used_on.name))

    def decode(tensors, mode, device):
        calls.append(("decode", current["stream"].name, str(device), len(tensors)))
        return [Decoded() for _ in tensors]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(Stream(f"side{len(made)}")) or made[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(device_augment, "decode_jpeg", decode)
    finish = DeviceFinish(MEAN, STD, decode_size=8)
    jpegs = [torch.frombuffer(bytearray(_jpeg(np.random.default_rng(k), 20, 16)), dtype=torch.uint8) for k in range(2)]
    for _ in range(2):  # two batches: one side stream, made once
        finish.decode_after_current_stream(jpegs, torch.device("cuda", 0))
    once = [("wait", "side0", "training"), ("decode", "side0", "cuda:0", 2), ("wait", "training", "side0"),
            ("record", "training"), ("record", "training")]
    assert calls == once * 2 and len(made) == 1
    monkeypatch.undo()
    on_cpu = finish.decode_after_current_stream(jpegs, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, decode_jpeg(jpegs, mode=ImageReadMode.RGB)))
