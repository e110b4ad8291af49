"""DeiTImageProcessor: same numbers as the eval transform, any input layout, HF-style options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import deit_train
from deit_train.data.transforms import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(width=61, height=47, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,crop_pct", [(32, 0.875), (24, 0.9), (40, 1.0)])
def test_equals_the_eval_transform_on_pil_numpy_and_tensor_inputs(size, crop_pct):
    processor = deit_train.DeiTImageProcessor.from_eval_config(size, crop_pct, MEAN, STD)
    image = photo()
    expected = eval_transform(size, MEAN, STD, crop_pct)(image)
    hwc = np.asarray(image)
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    for given in (image, hwc, chw):
        pixels = processor(given, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32
        torch.testing.assert_close(pixels[0], expected, atol=1e-6, rtol=0)


def test_batches_and_other_modes():
    processor = deit_train.DeiTImageProcessor(crop_size=16, image_mean=MEAN, image_std=STD)
    images = [photo(seed=1), photo(30, 20, seed=2).convert("L"), photo(seed=3).convert("RGBA")]
    pixels = processor(images)["pixel_values"]
    assert pixels.shape == (3, 3, 16, 16)
    grey = eval_transform(16, MEAN, STD)(images[1].convert("RGB"))
    torch.testing.assert_close(pixels[1], grey, atol=1e-6, rtol=0)
    stacked = np.stack([np.asarray(photo(seed=s)) for s in (4, 5)])  # NHWC uint8
    assert processor(stacked)["pixel_values"].shape == (2, 3, 16, 16)
    assert processor(images[0], return_tensors="np")["pixel_values"].dtype == np.float32


def test_default_resize_is_size_over_crop_pct_and_options_switch_steps():
    assert deit_train.DeiTImageProcessor(crop_size=224).size == 256
    assert deit_train.DeiTImageProcessor(crop_size=384).size == 438
    processor = deit_train.DeiTImageProcessor(crop_size=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    raw = processor(image, do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    assert raw["pixel_values"][0, :, 0, 0].tolist() == [255.0, 0.0, 51.0]
    rescaled = processor(image, do_resize=False, do_normalize=False)["pixel_values"][0, :, 0, 0]
    torch.testing.assert_close(rescaled, torch.tensor([1.0, 0.0, 0.2]))
    normalised = processor(image, do_resize=False)["pixel_values"][0, :, 0, 0]
    torch.testing.assert_close(normalised, torch.tensor([1.0, -1.0, -0.6]))
    exact = processor(Image.new("RGB", (30, 10)), size={"height": 12, "width": 9}, do_center_crop=False)
    assert exact["pixel_values"].shape == (1, 3, 12, 9)


def test_float_inputs_follow_the_uint8_path_closely():
    processor = deit_train.DeiTImageProcessor(crop_size=24, image_mean=MEAN, image_std=STD)
    image = Image.new("RGB", (40, 32), (200, 100, 50))
    from_uint8 = processor(image)["pixel_values"]
    floats = np.asarray(image).astype(np.float32) / 255.0
    from_float = processor(floats, do_rescale=False)["pixel_values"]
    torch.testing.assert_close(from_float, from_uint8, atol=1e-4, rtol=0)  # flat colour: resampling agrees


def test_matches_transformers_on_a_square_image():
    transformers = pytest.importorskip("transformers")
    image = photo(64, 64, seed=7)
    ours = deit_train.DeiTImageProcessor(crop_size=48, crop_pct=0.875)(image)["pixel_values"]
    # the PIL backend: resampling as our eval transform; a square image makes HF's fixed-size resize equal ours
    theirs = transformers.DeiTImageProcessorPil(size={"height": 54, "width": 54}, crop_size={"height": 48, "width": 48},
                                                image_mean=MEAN, image_std=STD)(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 48, 48)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
