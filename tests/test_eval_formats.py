"""`python -m deit_train.eval` scores every format a DeiT comes in (ours, official .pth, timm file and directory,
transformers directories) with the same logits and metrics, and says which preprocessing it used."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import DIGITS_DEIT
from deit_train.data import DigitsDataModule
from deit_train.eval import compose_group, main, score
from deit_train.export import export
from deit_train.models import create_deit
from deit_train.models.deit import average_heads, forward_heads
from deit_train.run.any_checkpoint import transformers_preprocessing, load_for_eval
from deit_train.run.trained_model import CHECKPOINT_KEY

try:
    import transformers
except ImportError:  # an optional extra: pip install -e ".[hf]"
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason='transformers not installed (pip install -e ".[hf]")')

# files without a preprocessing config get the paper's ImageNet mean/std; the digits networks were trained with 0.5
DIGITS_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
# a state dict does not say its architecture: model=deit_tiny with the digits sizes
STATE_DICT_ARCH = {"model": "deit_tiny", "model_overrides": DIGITS_DEIT}
# Weights are copied (timm's fused qkv split for transformers and concatenated back) and the same timm modules
# run on the same pixels: the logits agree to the bit; the bound leaves room for a kernel choice only.
LOGIT_TOLERANCE = 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads on a busy machine are ten times slower than one
    yield
    torch.set_num_threads(threads)


def random_network(distilled: bool) -> torch.nn.Module:
    torch.manual_seed(1)
    model = create_deit(**DIGITS_DEIT, num_classes=10, distilled=distilled, drop_path_rate=0.0)
    for p in model.parameters():  # logits a few units apart: a changed weight flips argmaxes
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def lightning_checkpoint(network: torch.nn.Module, path: Path) -> Path:
    """What a training run on the digits writes: Lightning's state_dict + the stored model/data config."""
    model_config = {"_target_": "deit_train.models.create_deit", **DIGITS_DEIT, "num_classes": 10,
                    "distilled": network.num_prefix_tokens == 2, "pretrained": None, "init_from": None,
                    "drop_path_rate": 0.0}
    data = compose_group("data", "digits", {"image_size": DIGITS_DEIT["image_size"]})
    torch.save({"state_dict": {f"student.{k}": v for k, v in network.state_dict().items()}, "epoch": 0,
                CHECKPOINT_KEY: {"model": model_config, "data": data, "class_names": [str(i) for i in range(10)]}},
               path)
    return path


def write_formats(network: torch.nn.Module, folder: Path) -> dict[str, tuple[Path, dict]]:
    """The network in every format, each with the eval options it needs."""
    folder.mkdir(parents=True, exist_ok=True)
    state = network.state_dict()
    ours = lightning_checkpoint(network, folder / "run.ckpt")
    torch.save({"model": state}, folder / "official.pth")  # the official DeiT repo's layout
    torch.save({"model": state}, folder / "official_legacy.pth", _use_new_zipfile_serialization=False)  # torch < 1.6
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "timm.safetensors"))  # a timm file
    export(ours, "timm", folder / "timm_dir")
    files = {
        "ours (.ckpt)": (ours, {}),
        "official .pth": (folder / "official.pth", {"data": "digits", "data_overrides": DIGITS_NORM,
                                                     **STATE_DICT_ARCH}),
        "official .pth, torch's legacy format": (folder / "official_legacy.pth",
                                                  {"data": "digits", "data_overrides": DIGITS_NORM, **STATE_DICT_ARCH}),
        "timm .safetensors": (folder / "timm.safetensors", {"data": "digits", "data_overrides": DIGITS_NORM,
                                                             **STATE_DICT_ARCH}),
        "timm directory": (folder / "timm_dir", {"data": "digits"}),
        # its weights file, passed alone: read with the directory's config.json
        "timm directory's model.safetensors": (folder / "timm_dir" / "model.safetensors", {"data": "digits"}),
    }
    if transformers is not None:
        classes = (["DeiTForImageClassificationWithTeacher", "DeiTForImageClassification"]
                   if network.num_prefix_tokens == 2 else ["ViTForImageClassification"])
        for hf_class in classes:
            export(ours, "hf", folder / hf_class, hf_class=hf_class)
            files[f"transformers {hf_class}"] = (folder / hf_class, {"data": "digits"})
    return files


def _pixels() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _logits(network, pixels, heads=("cls", "dist")):
    with torch.no_grad():
        cls, dist = forward_heads(network, pixels)
    return cls, (dist if "dist" in heads else None)


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "cls_only"])
def test_every_format_of_one_network_gives_its_logits_and_metrics(distilled, tmp_path):
    network = random_network(distilled)
    pixels = _pixels()
    expected_cls, expected_dist = _logits(network, pixels)
    reference = None
    for name, (path, options) in write_formats(network, tmp_path).items():
        loaded = load_for_eval(path, compose_group("model", options["model"], options["model_overrides"])
                               if "model" in options else None, options.get("model"))
        cls, dist = _logits(loaded.model, pixels, loaded.heads)
        assert (cls - expected_cls).abs().max() <= LOGIT_TOLERANCE, name
        only_cls = name.endswith("DeiTForImageClassification")  # the class token's head only
        assert loaded.heads == (("cls",) if only_cls or not distilled else ("cls", "dist")), name
        if dist is not None:
            assert (dist - expected_dist).abs().max() <= LOGIT_TOLERANCE, name
        metrics = score(path, **options).metrics
        if reference is None:
            reference = metrics
        heads_of_reference = {k: v for k, v in reference.items() if "dist" not in k and "pred" not in k}
        if only_cls:  # its prediction is the class head's: compare with the class head of the others
            assert metrics["test/top1"] == pytest.approx(reference["test/top1_cls"], abs=1e-6), name
            assert set(metrics) == {k for k in heads_of_reference}, name
            continue
        assert set(metrics) == set(reference), name
        for key, value in reference.items():
            if key != "test/throughput":
                assert metrics[key] == pytest.approx(value, abs=1e-6), (name, key)


def _direct_accuracy(network) -> dict[str, float]:
    """Top-1 of the prediction and of each head on the digits' test split, counted here (not by eval)."""
    data = DigitsDataModule(image_size=DIGITS_DEIT["image_size"])
    data.setup("test")
    hits = {"pred": 0, "cls": 0, "dist": 0}
    total = 0
    with torch.no_grad():
        for images, target in data.test_dataloader():
            cls, dist = forward_heads(network, images)
            for name, logits in (("pred", average_heads(cls, dist)), ("cls", cls), ("dist", dist)):
                hits[name] += int((logits.argmax(-1) == target).sum())
            total += len(target)
    return {name: count / total for name, count in hits.items()}


def test_official_and_timm_files_of_a_trained_network_reproduce_its_accuracy(digits_deit, tmp_path):
    accuracy = _direct_accuracy(digits_deit)
    assert accuracy["pred"] > 0.5  # trained: far above the 0.1 of chance
    formats = write_formats(digits_deit, tmp_path)
    for name in ("official .pth", "timm .safetensors", "timm directory", "ours (.ckpt)"):
        path, options = formats[name]
        metrics = score(path, **options).metrics
        assert metrics["test/top1"] == pytest.approx(accuracy["pred"], abs=1e-6), name
        assert metrics["test/top1_cls"] == pytest.approx(accuracy["cls"], abs=1e-6), name
        assert metrics["test/top1_dist"] == pytest.approx(accuracy["dist"], abs=1e-6), name


def test_official_file_under_the_papers_imagenet_normalisation_scores_what_that_input_gives(digits_deit, tmp_path):
    """Without data.mean/std the paper's preprocessing applies (ImageNet mean/std): the digits network then sees
    other pixels, and eval says so."""
    torch.save({"model": digits_deit.state_dict()}, tmp_path / "official.pth")
    report = score(tmp_path / "official.pth", data="digits", **STATE_DICT_ARCH)
    assert "preprocessing: paper: whole image resized to 16 px, mean (0.485, 0.456, 0.406)" in report.summary
    overridden = score(tmp_path / "official.pth", data="digits", data_overrides=DIGITS_NORM, **STATE_DICT_ARCH)
    assert "preprocessing: paper; from the command line: data.mean, data.std" in overridden.summary
    assert report.metrics["test/ce"] != pytest.approx(overridden.metrics["test/ce"], abs=1e-3)


@needs_hf
def test_each_format_names_the_preprocessing_it_used(tmp_path):
    formats = write_formats(random_network(True), tmp_path)
    expected = {"ours (.ckpt)": "preprocessing: its stored data config:",
                "timm directory": f"preprocessing: {tmp_path / 'timm_dir' / 'config.json'} pretrained_cfg:",
                "transformers DeiTForImageClassificationWithTeacher":
                    f"preprocessing: {tmp_path / 'DeiTForImageClassificationWithTeacher' / 'preprocessor_config.json'}:"}
    for name, start in expected.items():
        path, options = formats[name]
        summary = score(path, **options).summary
        assert start + " whole image resized to 16 px, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in summary, summary


def test_hub_style_preprocessor_config_is_read_as_transformers_reads_it(tmp_path):
    """facebook/deit-*-224 on the hub: ``size: 256`` (an int: transformers resizes to 256x256) and crop 224."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "DeiTFeatureExtractor", "size": 256, "crop_size": 224, "resample": 3,
        "do_resize": True, "do_center_crop": True, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    pre, source, note = transformers_preprocessing(tmp_path, 224)
    assert (pre.image_size, pre.resize_size, pre.interpolation) == (224, 256, "bicubic")
    assert source == str(tmp_path / "preprocessor_config.json")
    assert note.startswith("transformers resizes every image to 256x256 (aspect ratio not kept)")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    pre, _, note = transformers_preprocessing(tmp_path, 224)  # ViT's defaults: 224x224, no crop, mean/std 0.5
    assert (pre.image_size, pre.resize_size, pre.mean) == (224, 224, (0.5, 0.5, 0.5))


def test_cli_writes_metrics_and_confusion_matrix(tmp_path, capsys):
    network = random_network(True)
    ckpt = lightning_checkpoint(network, tmp_path / "run.ckpt")
    main([f"ckpt={ckpt}", f"out={tmp_path / 'eval' / 'metrics.json'}", "split=val"])
    captured = capsys.readouterr()
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert json.loads(captured.out) == written
    assert captured.err.startswith(f"eval: ckpt={ckpt} (Lightning checkpoint of this framework")
    # the names of training's results.json (val/ here: split=val)
    assert {"val/top1", "val/top5", "val/top1_cls", "val/top5_cls", "val/top1_dist", "val/top5_dist", "val/ce",
            "val/throughput", "val/disagree_cls_dist"} <= set(written)
    with Image.open(written["confusion_matrix"]) as png:
        assert png.size[0] > 300 and png.format == "PNG"


# ---- bad input: one line naming the file and the option ---------------------------------------------------------
def _error(argv, capsys) -> str:
    capsys.readouterr()  # what the test's own setup printed (export's progress)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


SIZE_OPTIONS = [f"model.{k}={v}" for k, v in DIGITS_DEIT.items()]


def test_file_without_a_deit_is_one_line(digits_teacher_file, capsys):
    line = _error([f"ckpt={digits_teacher_file}", "data=digits", "model=deit_tiny", *SIZE_OPTIONS], capsys)
    assert line.startswith(f"error: ckpt={digits_teacher_file} holds no DeiT/ViT weights (no patch_embed.proj.weight")


def test_class_count_other_than_the_datas_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    state = create_deit(**DIGITS_DEIT, num_classes=7).state_dict()
    torch.save({"model": state}, tmp_path / "seven.pth")
    line = _error([f"ckpt={tmp_path / 'seven.pth'}", "data=digits", "model=deit_tiny", *SIZE_OPTIONS], capsys)
    assert line == (f"error: ckpt={tmp_path / 'seven.pth'} has 7 classes, data=digits has 10: evaluate it on the "
                    "data set it was trained for (data=..., data.root=...)")


@needs_hf
def test_transformers_directory_without_weights_is_one_line(tmp_path, capsys):
    ours = lightning_checkpoint(random_network(True), tmp_path / "run.ckpt")
    export(ours, "hf", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    line = _error([f"ckpt={tmp_path / 'hf'}", "data=digits"], capsys)
    assert line.startswith(f"error: ckpt={tmp_path / 'hf'} is a transformers directory without weights")


def test_wrong_or_missing_architecture_is_one_line(tmp_path, capsys):
    torch.save({"model": random_network(True).state_dict()}, tmp_path / "official.pth")
    line = _error([f"ckpt={tmp_path / 'official.pth'}", "data=digits", "model=deit_small"], capsys)
    assert line.startswith(f"error: ckpt={tmp_path / 'official.pth'} has other shapes than the model: "
                           "['cls_token (1, 1, 32) vs model (1, 1, 384)'")
    assert line.endswith("; set model= to the size the file was trained as (deit_tiny, deit_small, deit_base, "
                         "deit_base_384) or model.hidden_size/patch_size/mlp_ratio/num_hidden_layers/image_size")
    line = _error([f"ckpt={tmp_path / 'official.pth'}", "data=digits"], capsys)
    assert line.startswith(f"error: ckpt={tmp_path / 'official.pth'} is a state dict that does not say its "
                           "architecture: pass model=<size>")
    ours = lightning_checkpoint(random_network(True), tmp_path / "run.ckpt")
    line = _error([f"ckpt={ours}", "model=deit_small"], capsys)
    assert line == (f"error: model=deit_small does not apply: ckpt={ours} says its architecture (its stored run "
                    "config); drop model= and model.* options")


# ---- the paper's Table 5 script ------------------------------------------------------------------------------------
def test_table5_script_runs_eval_on_each_official_file_and_compares(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "scripts/eval_paper_table5.py", "--imagenet", "/data/imagenet",
                           "--weights", str(tmp_path), "--out", str(tmp_path / "t5"), "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == (
        f"$ python -m deit_train.eval ckpt={tmp_path}/deit_small_distilled_patch16_224-649709d9.pth model=deit_small "
        f"data=imagefolder data.root=/data/imagenet split=val out={tmp_path}/t5/deit_small.json")
    missing = subprocess.run([sys.executable, "scripts/eval_paper_table5.py", "--imagenet", "/data/imagenet",
                              "--weights", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: {tmp_path}/deit_tiny_distilled_patch16_224-b40b3cf7.pth does not exist")
    sys.path.insert(0, str(ROOT / "scripts"))
    from eval_paper_table5 import table

    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "deit_small.json").write_text(json.dumps(
        {"val/top1": 0.8115, "val/top5": 0.9538, "val/ce": 0.7521, "val/throughput": 2000.0}))
    assert table(tmp_path / "t5").splitlines()[2] == (
        "| DeiT-S⚗ | 81.150 | 81.164 | -0.014 | 95.380 | 95.376 | 0.752 | 0.752 | 2000 |")


def test_imagefolder_gets_the_papers_preprocessing(tmp_path):
    """An official file on an ImageNet-layout folder of non-square images: eval's numbers are the network's on
    pixels made by hand the paper's way (short side to floor(16 / 0.875) = 18 bicubic, center crop 16, ImageNet
    mean/std)."""
    import numpy as np
    from torch.nn import functional as F
    from torchvision.transforms import v2

    network = random_network(True)
    torch.save({"model": network.state_dict()}, tmp_path / "official.pth")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(10):
        for split, count in (("train", 1), ("val", 2)):
            folder = tmp_path / "imagenet" / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
                image.save(folder / f"{i}.png")
                if split == "val":
                    images.append(image)
                    labels.append(label)
    by_hand = v2.Compose([v2.Resize(18, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(16),
                          v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        cls, dist = forward_heads(network, torch.stack([by_hand(image) for image in images]))
    prediction, target = average_heads(cls, dist), torch.tensor(labels)
    report = score(tmp_path / "official.pth", split="val", data="imagefolder",
                   data_overrides={"root": str(tmp_path / "imagenet"), "num_workers": 0}, **STATE_DICT_ARCH)
    assert "preprocessing: paper: resize short side to 18 bicubic, center crop 16, mean (0.485, 0.456, 0.406)" \
        in report.summary
    assert report.metrics["val/images"] == 20
    assert report.metrics["val/top1"] == pytest.approx((prediction.argmax(-1) == target).float().mean().item(), abs=1e-6)
    assert report.metrics["val/ce"] == pytest.approx(F.cross_entropy(prediction, target).item(), abs=1e-5)
