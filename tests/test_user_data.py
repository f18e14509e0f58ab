"""A user's data files (``--data`` / ``--test-data``, image folders and CSVs): near-duplicates
across the splits are reported, labels are read as the user meant them, and images are one image
by their bytes. The built-in tasks' splits are pinned: nothing here may move them."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from fisherlora.errors import ConfigError
from fisherlora.experiments.generation_tasks import load_generation_task
from fisherlora.experiments.images import load_image_task
from fisherlora.experiments.task_kinds import load_data
from fisherlora.experiments.tasks import load_task, split_by_hash
from fisherlora.experiments.train import TrainConfig


def near_duplicate_key(text: str) -> str:
    return " ".join(text.casefold().split())


def fingerprint(*lists) -> str:
    return hashlib.sha256(json.dumps(lists).encode()).hexdigest()


# --- the built-in tasks: the same examples, order, labels and texts as before -----------------


def test_the_built_in_tasks_splits_are_unchanged(capsys):
    # sha256 of [train_texts, train_labels, test_texts, test_labels, class_names] (and of the
    # prompts for -gen) as the loaders gave them before user-data checks were added: benchmark
    # runs depend on these splits, so a change here moves their examples
    rt = load_task("rotten-tomatoes")
    digits = load_image_task("digits")
    gen = load_generation_task("rotten-tomatoes-gen")
    assert (
        fingerprint(rt.train_texts, rt.train_labels, rt.test_texts, rt.test_labels, rt.class_names)
        == "1052ae9c0c699087e0f2578c089ca98c4aceb802d7fc2afceaca79e0ab002207"
    )
    assert (
        fingerprint(
            digits.train_texts,
            digits.train_labels,
            digits.test_texts,
            digits.test_labels,
            digits.class_names,
        )
        == "aa74b53d8dd35a28af024db803caf89a948e960f65d534411fef66b7aac14fbb"
    )
    assert (
        fingerprint(
            gen.train_prompts,
            gen.train_completions,
            gen.test_prompts,
            gen.test_completions,
            gen.test_labels,
            gen.choices,
        )
        == "90bf73205b9e7d5dbe52be9411863450facbcfcfe2341aa3bc429afad01390ff"
    )
    assert "near-duplicates" not in capsys.readouterr().err  # none in Rotten Tomatoes


# --- 1. near-duplicate texts across train and test ----------------------------------------------


def test_near_duplicates_across_the_hash_split_are_counted_and_kept(tmp_path, capsys):
    rows = [f"review {i} was {'good' if i % 2 else 'bad'},{i % 2}" for i in range(40)]
    rows += [f"Review {i} was {'good' if i % 2 else 'bad'}  ,{i % 2}" for i in range(40)]
    (tmp_path / "ws.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    texts = [row.rsplit(",", 1)[0] for row in rows]
    task = load_task(data=tmp_path / "ws.csv")
    # the split is the hash split of every row: nothing dropped or moved
    train, _, test, _ = split_by_hash(texts, [0] * len(texts), 0.2345)
    assert sorted(task.train_texts) == sorted(train) and sorted(task.test_texts) == sorted(test)
    train_keys = {near_duplicate_key(t) for t in task.train_texts}
    expected = sum(near_duplicate_key(t) in train_keys for t in task.test_texts)
    assert expected > 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert f"{expected} of {len(task.test_texts)} test texts are near-duplicates" in err
    assert "e.g. test '" in err and "~ train '" in err


def test_near_duplicates_of_a_separate_test_file_are_counted(tmp_path, capsys):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"review {i} was ok,{i % 2}\n" for i in range(20)))
    test.write_text("text,label\nREVIEW 3   was ok,1\n review 4 was\tok ,0\nsomething new,1\n")
    task = load_task(data=train, test_data=test)
    assert task.sizes() == {"train": 20, "test": 3}  # kept: a warning changes no data
    err = capsys.readouterr().err
    assert "2 of 3 test texts are near-duplicates of a training text" in err
    assert "'REVIEW 3   was ok' ~ train 'review 3 was ok'" in err


# --- 2. string labels that differ only by surrounding whitespace --------------------------------


def test_string_labels_lose_their_surrounding_whitespace_in_train_and_test(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    labels = [" pos", "pos ", "pos", "neg", "  neg  "]
    train.write_text("text,label\n" + "".join(f"review {i},{labels[i % 5]}\n" for i in range(40)))
    test.write_text("text,label\nfresh one, pos\nfresh two,neg \n")
    task = load_task(data=train, test_data=test)
    assert task.class_names == ["neg", "pos"]
    assert sorted(task.test_labels) == [0, 1]
    # a hash split of one file as well
    assert load_task(data=train).class_names == ["neg", "pos"]


def test_an_image_csv_strips_its_string_labels(tmp_path):
    root = write_images(tmp_path / "pets", ("cat", "dog"), 10)
    rows = [f"{p.parent.name}/{p.name}, {p.parent.name} " for p in sorted(root.rglob("*.png"))]
    (root / "index.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    assert load_image_task(data=root / "index.csv").class_names == ["cat", "dog"]


# --- 5. labels that are not one value -----------------------------------------------------------


@pytest.mark.parametrize(("label", "kind"), [([1], "list"), ({"y": 1}, "dict")])
def test_a_list_or_mapping_label_is_refused_with_its_column_and_row(tmp_path, label, kind):
    rows = [{"text": f"r {i}", "stars": i % 2} for i in range(10)]
    rows[3]["stars"] = label
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ConfigError, match=rf"column 'stars' holds a {kind}.*row 4.*'r 3'"):
        load_task(data=path, label_column="stars")


# --- 6. labels of another type in the test file -------------------------------------------------


def test_unseen_test_labels_are_listed_with_their_types_and_the_training_labels(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.jsonl"
    train.write_text(
        "text,label\n" + "".join(f"r {i},{['1', '2', 'x'][i % 3]}\n" for i in range(30))
    )
    test.write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 2 + 1}) for i in range(6)))
    with pytest.raises(ConfigError) as err:
        load_task(data=train, test_data=test)
    message = str(err.value)
    assert "test labels [1 (int), 2 (int)] never occur" in message
    assert "whose labels are ['1' (str), '2' (str), 'x' (str)]" in message
    assert "the number 1 and the text '1' are two labels" in message


def test_training_labels_that_print_alike_in_two_types_are_refused(tmp_path):
    # read_json keeps a column with a non-numeric value as objects: 1 and '1' would be two
    # classes, both named "1"
    path = tmp_path / "d.jsonl"
    labels = ["1", 1, "x"]
    path.write_text(
        "\n".join(json.dumps({"text": f"r {i}", "label": labels[i % 3]}) for i in range(30))
    )
    with pytest.raises(ConfigError, match=r"\[1 \(int\), '1' \(str\)\] print alike"):
        load_task(data=path)


# --- 7. an image CSV without an image column, or without its label column ----------------------


def test_a_csv_of_image_paths_without_an_image_column_is_told_to_name_it_image(tmp_path):
    root = write_images(tmp_path / "pets", ("cat", "dog"), 6)
    rows = [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    # the command line's route: not image data (no `image` column), so the text loader
    with pytest.raises(ConfigError) as err:
        load_data(TrainConfig(data=str(root / "list.csv")))
    message = str(err.value)
    assert "column 'path' holds image paths (e.g. 'cat/000.png')" in message
    assert "an image CSV needs its paths in a column named 'image'" in message


def test_an_image_csv_without_its_label_column_points_at_label_column_only(tmp_path):
    root = write_images(tmp_path / "pets", ("cat", "dog"), 6)
    rows = [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (root / "list.csv").write_text("image,y\n" + "\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"no column 'label'") as err:
        load_data(TrainConfig(data=str(root / "list.csv")))
    assert "--label-column" in str(err.value) and "--text-column" not in str(err.value)


# --- 3. images are one image by their bytes -----------------------------------------------------


def write_images(root, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.integers(0, 80, (12, 12, 3)) + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def digest(path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_copies_of_an_image_under_other_names_are_one_image(tmp_path, capsys):
    root = write_images(tmp_path / "pets", ("cat", "dog"), 30)
    for i in range(6):  # six copies under other names: 10% of the folder
        (root / "cat" / f"copy_{i:03d}.png").write_bytes(
            (root / "cat" / f"{i:03d}.png").read_bytes()
        )
    task = load_image_task(data=root)
    assert sum(task.sizes().values()) == 60
    keys = task.train_texts + task.test_texts
    assert not any(k.startswith("cat/copy_") for k in keys)
    train = {digest(root / k) for k in task.train_texts}
    assert not train & {digest(root / k) for k in task.test_texts}
    assert "dropped 6 of 66 images whose bytes repeat an earlier image's" in capsys.readouterr().err
    # the images that are not copies keep their split by path hash
    plain = load_image_task(data=write_images(tmp_path / "plain", ("cat", "dog"), 30))
    assert task.test_texts == plain.test_texts and task.train_texts == plain.train_texts


def test_too_many_copies_are_refused_as_too_many_dropped_rows(tmp_path):
    root = write_images(tmp_path / "pets", ("cat", "dog"), 10)
    for i in range(10):
        (root / "dog" / f"copy_{i:03d}.png").write_bytes(
            (root / "cat" / f"{i:03d}.png").read_bytes()
        )
    with pytest.raises(ConfigError, match=r"dropped 10 of 30 images.*10 of the copies had another"):
        load_image_task(data=root)
    assert load_image_task(data=root, max_dropped_fraction=0.5).class_names == ["cat", "dog"]


def test_a_test_folder_holding_copies_of_training_images_takes_them_out_of_training(
    tmp_path, capsys
):
    train_root = write_images(tmp_path / "train", ("cat", "dog"), 10)
    test_root = write_images(tmp_path / "test", ("cat", "dog"), 3, seed=1)
    for name in ("cat", "dog"):  # a training image in the test folder, under another name
        (test_root / name / "leak.png").write_bytes((train_root / name / "004.png").read_bytes())
    task = load_image_task(data=train_root, test_data=test_root)
    assert task.sizes() == {"train": 18, "test": 8}
    assert "cat/004.png" not in task.train_texts and "dog/004.png" not in task.train_texts
    assert "dropped 2 of 20 training rows whose text or image is also in the test split" in (
        capsys.readouterr().err
    )


# --- 4. 16-bit, 32-bit and floating-point grey images -------------------------------------------


def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    root = tmp_path / "grey"
    for c, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(10):  # the last pixel makes each file distinct
            values = [[0, 257, 257 * 100, 257 * 200 + 100, 65535, 128, 1000 * i + 100 * c]]
            Image.fromarray(np.array(values, dtype=np.uint16)).save(root / name / f"{i}.png")
    task = load_image_task(data=root)
    key = "dark/0.png"
    assert key in task.train_texts + task.test_texts
    assert Image.open(root / key).mode == "I;16"
    rgb = np.asarray(task.image(key))
    assert rgb.shape == (1, 7, 3)
    # round(value / 257); a plain convert("RGB") clipped everything above 255 to white
    assert rgb[0, :, 0].tolist() == [0, 1, 100, 200, 255, 0, 0]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


@pytest.mark.parametrize(("mode", "dtype"), [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")])
def test_every_16_bit_mode_is_scaled(mode, dtype):
    from fisherlora.experiments.images import to_rgb

    values = np.array([[0, 257 * 7, 65535]])
    image = Image.frombytes(mode, (3, 1), values.astype(dtype).tobytes())
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 7, 255]


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_and_floating_point_images_are_refused_by_file_and_mode(tmp_path, mode):
    root = write_images(tmp_path / "pets", ("cat", "dog"), 10)
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).convert(mode).save(
        root / "dog" / "deep.tif"
    )
    assert Image.open(root / "dog" / "deep.tif").mode == mode
    with pytest.raises(ConfigError, match=rf"dog/deep\.tif \(mode '{mode}'\)"):
        load_image_task(data=root)
