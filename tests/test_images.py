"""Image classification: the built-in digits, image folders and CSVs split like text, a tiny
random ViT, every method and peer unchanged at init with a stock export on it, and the runner."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from PIL import Image

from fisherlora.errors import ConfigError
from fisherlora.experiments.image_models import load_image_model
from fisherlora.experiments.images import ImageTask, is_image_data, load_image_task
from fisherlora.experiments.models import default_targets
from fisherlora.experiments.task_kinds import ImageClassification, task_kind
from fisherlora.experiments.train import TrainConfig, train
from fisherlora.methods import get_method

METHODS = [
    "lora",
    "fim-lora",
    "filet",
    "filet-svd",
    "fw-lora",
    "fim-lora+filet+fw-lora",
    "random-rank",
    "dora",
    "pissa",
    "eva",
    "lora-ga",
    "corda",
    "adalora",
]


def write_folder(root, classes=("cat", "dog", "fox"), per_class=12, size=(20, 14), seed=0):
    """PNG images in one sub-folder per class; each class a different mean colour. Two folders
    of one seed share images (the same bytes): one image, and a test image leaves training."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (*size, 3)) + 90 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def digits():
    return load_image_task("digits")


def test_digits_are_the_real_sklearn_digits_split_by_a_stable_hash(digits):
    assert isinstance(digits, ImageTask)
    assert digits.class_names == [str(d) for d in range(10)]
    sizes = digits.sizes()
    assert sizes["train"] + sizes["test"] == 1797
    assert 0.2 < sizes["test"] / 1797 < 0.27
    assert not set(digits.train_texts) & set(digits.test_texts)
    image = digits.image(digits.train_texts[0])
    assert image.mode == "RGB" and image.size == (8, 8)
    assert load_image_task("digits").train_texts == digits.train_texts  # the same split again
    carved = digits.carve_validation(0.1)
    assert not set(carved.val_texts) & (set(carved.train_texts) | set(carved.test_texts))
    assert carved.test_texts == digits.test_texts


def test_folder_and_csv_give_the_same_task(tmp_path):
    root = write_folder(tmp_path / "pets")
    from_folder = load_image_task(data=root)
    rows = [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (root / "index.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    from_csv = load_image_task(data=root / "index.csv")
    assert from_folder.class_names == from_csv.class_names == ["cat", "dog", "fox"]
    assert from_folder.train_texts == from_csv.train_texts
    assert from_folder.test_labels == from_csv.test_labels
    assert is_image_data("rotten-tomatoes", root) and is_image_data("x", root / "index.csv")
    assert is_image_data("digits", None) and not is_image_data("rotten-tomatoes", None)
    # the split does not depend on where the folder lies
    moved = load_image_task(data=write_folder(tmp_path / "elsewhere" / "pets"))
    assert moved.train_texts == from_folder.train_texts
    assert np.array_equal(
        np.asarray(moved.image(moved.test_texts[0])),
        np.asarray(from_folder.image(from_folder.test_texts[0])),
    )


def test_a_separate_test_folder_replaces_the_hash_split(tmp_path):
    train_root = write_folder(tmp_path / "train", per_class=4)
    test_root = write_folder(tmp_path / "test", per_class=2, seed=1)  # other images
    task = load_image_task(data=train_root, test_data=test_root)
    assert task.sizes() == {"train": 12, "test": 6}
    assert task.image(task.test_texts[0]).size == (14, 20)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "no images"),
        (lambda p: write_folder(p, classes=("only",), per_class=40), "at least two"),
        (lambda p: (p.parent / "x.csv").write_text("image,label\nmissing.png,a\n"), "do not exist"),
        (lambda p: (p.parent / "x.csv").write_text("path,label\na.png,a\n"), "no column 'image'"),
    ],
)
def test_bad_image_data_is_refused_with_a_clear_error(tmp_path, make, message):
    path = tmp_path / "data"
    make(path)
    source = path if path.exists() else tmp_path / "x.csv"
    with pytest.raises(ConfigError, match=message):
        load_image_task(data=source)


def test_an_unreadable_image_is_refused_by_name_when_the_data_loads(tmp_path):
    # before: found only when its batch came up, hours into a run on a large folder
    root = write_folder(tmp_path / "pets", per_class=6)
    (root / "cat" / "000.png").write_bytes(b"not an image")
    (root / "dog" / "003.png").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"2 image\(s\) cannot be read: cat/000\.png.*dog/003\.png"
    ):
        load_image_task(data=root)


def test_an_empty_class_folder_is_refused_not_dropped(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=6)
    (root / "bird").mkdir()
    with pytest.raises(ConfigError, match=r"\['bird'\] hold no images"):
        load_image_task(data=root)


def test_a_file_listed_under_two_spellings_is_one_image_and_test_images_leave_training(
    tmp_path, capsys
):
    root = write_folder(tmp_path / "pets", per_class=6)
    files = sorted(root.rglob("*.png"))
    rows = [f"{p.parent.name}/{p.name},{p.parent.name}" for p in files]
    rows += [f"./{p.parent.name}/{p.name},{p.parent.name}" for p in files]  # each again
    rows += [f"{p},{p.parent.name}" for p in files[:3]]  # and absolute
    (root / "index.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    task = load_image_task(data=root / "index.csv", max_dropped_fraction=None)
    assert task.sizes()["train"] + task.sizes()["test"] == len(files)
    assert not set(task.train_texts) & set(task.test_texts)
    # a test folder that holds the training images: they leave training (none is left here)
    with pytest.raises(ConfigError, match="0 training and 18 test images"):
        load_image_task(data=root, test_data=root)
    assert "dropped 18 of 18 training rows whose text or image is also in the test split" in (
        capsys.readouterr().err
    )


def test_tiny_vit_batches_and_default_targets(digits):
    kind = task_kind(digits, TrainConfig(task="digits"))
    assert isinstance(kind, ImageClassification)
    model = kind.load_model("tiny-vit", seed=0)
    batch = next(iter(kind.train_batches(8, seed=0)))
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert model(**batch).loss.isfinite()
    targets = default_targets(model, verbose=False)
    linear = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) <= linear and "classifier" not in targets
    # the same order again from the same seed
    again = next(iter(kind.train_batches(8, seed=0)))
    assert torch.equal(again["labels"], batch["labels"])


def vit_setup(seed: int = 3):
    model, _ = load_image_model("tiny-vit", 4, seed=seed)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    batches = [
        {
            "pixel_values": torch.randn(8, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, 4, (8,), generator=generator),
        }
        for _ in range(4)
    ]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=default_targets(model, verbose=False),
        modules_to_save=["classifier"],
    )
    return model, config, batches


def vit_logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(pixel_values=b["pixel_values"]).logits for b in batches])


@pytest.mark.parametrize("name", METHODS)
def test_every_method_keeps_vit_outputs_at_init_and_exports_a_stock_adapter(name, tmp_path):
    base, config, batches = vit_setup()
    original = copy.deepcopy(base)
    method = get_method(name, {"calib_batches": 4, "steps": 20, "progress": False})
    model = method.build(base, config, batches)
    method.prepare(model, batches)
    torch.testing.assert_close(
        vit_logits(model, batches), vit_logits(original, batches), atol=1e-5, rtol=0
    )
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every adapter and head parameter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = vit_logits(model, batches)
    method.export(model, tmp_path)
    reloaded = PeftModel.from_pretrained(original, tmp_path)
    torch.testing.assert_close(vit_logits(reloaded, batches), trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "fim-lora+filet+fw-lora"])
def test_runner_trains_tiny_vit_on_digits(tmp_path, method):
    config = TrainConfig(
        task="digits",
        model="tiny-vit",
        method=method,
        steps=6,
        batch_size=16,
        eval_every=3,
        calib_batches=2,
        fw_warmup_steps=2,
        val_fraction=0.1,
        max_test=64,
        out=str(tmp_path / method),
    )
    result = train(config, progress=False)
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert len(result.curve) == 2  # evaluated at steps 3 and 6
    # the validation accuracy reported is the last evaluation's on the validation split
    assert set(result.curve["split"]) == {"validation"}
    assert saved["val_accuracy"] == result.curve["accuracy"].iloc[-1]
    assert np.isfinite(saved["nll"])
    assert np.isfinite(result.curve["train_loss"]).all()
    if method == "lora":  # B starts at zero: one that is not zero everywhere was trained
        b_factors = [p for n, p in result.model.named_parameters() if "lora_B" in n]
        assert b_factors and all(p.abs().sum() > 0 for p in b_factors)
    run_config = json.loads((tmp_path / method / "config.json").read_text())
    assert run_config["task"]["name"] == "digits"


def test_a_model_of_the_other_modality_is_refused_by_name(digits):
    from fisherlora.experiments.image_models import IMAGE_REGISTRY
    from fisherlora.experiments.model_names import IMAGE_MODEL_NAMES
    from fisherlora.experiments.models import load_model

    assert set(IMAGE_MODEL_NAMES) == set(IMAGE_REGISTRY)
    with pytest.raises(ConfigError, match="is a text model"):
        load_image_model("minilm", 10)
    with pytest.raises(ConfigError, match="is an image classifier"):
        load_model("tiny-vit", 2)


def test_a_model_whose_head_is_not_named_classifier_is_refused(digits, monkeypatch):
    import fisherlora.experiments.task_kinds.images as image_kind

    monkeypatch.setattr(
        image_kind, "load_image_model", lambda *a, **k: (torch.nn.Linear(2, 2), None)
    )
    kind = task_kind(digits, TrainConfig(task="digits"))
    with pytest.raises(ConfigError, match="no module named 'classifier'"):
        kind.load_model("some-vit", seed=0)
