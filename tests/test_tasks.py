import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from fisherlora.errors import ConfigError
from fisherlora.experiments.tasks import (
    deduplicate,
    hash_fraction,
    load_builtin_task,
    load_file_task,
    load_task,
    split_by_hash,
)


def test_hash_fraction_is_independent_of_the_interpreter_hash_seed():
    code = "from fisherlora.experiments.tasks import hash_fraction; print(repr(hash_fraction('a fine film')))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {repr(hash_fraction("a fine film")) + "\n"}


def test_hash_fraction_is_pinned():
    # blake2b(b"a fine film", digest_size=8) read big-endian / 2**64: a change here would move
    # examples between train and test on every machine.
    import hashlib

    expected = (
        int.from_bytes(hashlib.blake2b(b"a fine film", digest_size=8).digest(), "big") / 2**64
    )
    assert hash_fraction("a fine film") == expected
    assert 0.0 <= hash_fraction("") < 1.0


def test_split_does_not_depend_on_order_or_on_the_other_examples():
    texts = [f"review number {i}" for i in range(400)]
    labels = [i % 2 for i in range(400)]
    train_t, _, test_t, _ = split_by_hash(texts, labels, 0.25)
    rev_train, _, rev_test, _ = split_by_hash(texts[::-1], labels[::-1], 0.25)
    assert set(train_t) == set(rev_train) and set(test_t) == set(rev_test)
    _half_train, _, half_test, _ = split_by_hash(texts[:200], labels[:200], 0.25)
    assert set(half_test) == set(test_t) & set(texts[:200])
    assert set(train_t).isdisjoint(test_t)
    assert 60 < len(test_t) < 140  # ~ 0.25 of 400


def test_split_rejects_fraction_outside_unit_interval():
    with pytest.raises(ConfigError, match="test fraction"):
        split_by_hash(["a"], [0], 1.5)


def test_deduplicate_keeps_first_occurrence_and_drops_empty_texts():
    texts, labels = deduplicate(["a", "b", "a", "  ", "c"], [1, 0, 0, 1, 1])
    assert texts == ["a", "b", "c"] and labels == [1, 0, 1]


def test_rotten_tomatoes_split_sizes_are_stable():
    task = load_builtin_task("rotten-tomatoes")
    assert task.sizes() == {"train": 6536, "test": 1994}
    assert task.class_names == ["negative", "positive"]
    assert set(task.train_texts).isdisjoint(task.test_texts)
    assert sum(task.test_labels) == 991  # balanced: 991 positive of 1994


def test_unknown_task_lists_builtin_tasks():
    with pytest.raises(ConfigError, match="rotten-tomatoes"):
        load_builtin_task("sst-5")


def test_csv_with_string_labels_maps_them_to_ids(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,stars"] + [f"review {i},{['low', 'high', 'mid'][i % 3]}" for i in range(60)]
    path.write_text("\n".join(rows))
    task = load_file_task(path, label_column="stars")
    assert task.class_names == ["high", "low", "mid"]
    stars = {f"review {i}": ["low", "high", "mid"][i % 3] for i in range(60)}
    for texts, labels in (
        (task.train_texts, task.train_labels),
        (task.test_texts, task.test_labels),
    ):
        assert [task.class_names[y] for y in labels] == [stars[x] for x in texts]
    assert task.sizes()["train"] + task.sizes()["test"] == 60
    assert task.name == "reviews"


def test_jsonl_with_separate_test_file_and_numeric_label_order(tmp_path):
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text(
        "\n".join(json.dumps({"sentence": f"s{i}", "y": [10, 2][i % 2]}) for i in range(10))
    )
    test.write_text("\n".join(json.dumps({"sentence": f"t{i}", "y": 10}) for i in range(3)))
    task = load_task(data=train, test_data=test, text_column="sentence", label_column="y")
    assert task.class_names == ["2", "10"]  # numeric order, not text order
    assert task.test_labels == [1, 1, 1]
    assert task.sizes() == {"train": 10, "test": 3}


def test_a_text_in_both_files_is_dropped_from_training_and_counted(tmp_path, capsys):
    # separate files are not split by one hash: a shared text would be trained on and tested on
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"train text {i},{i % 2}\n" for i in range(40)))
    test.write_text("text,label\ntrain text 1,1\ntrain text 2,0\nonly in test,1\n")
    task = load_task(data=train, test_data=test)
    assert task.sizes() == {"train": 38, "test": 3}
    assert not set(task.train_texts) & set(task.test_texts)
    assert "dropped 2 of 40 training rows whose text or image is also in the test split" in (
        capsys.readouterr().err
    )


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_task(data=tmp_path / "nope.csv")


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,label\nx,0\ny,1\n")
    with pytest.raises(ConfigError, match=r"no column 'text'.*\['review', 'label'\]"):
        load_task(data=path)


def test_one_class_is_rejected(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "\n".join(f"t{i},1" for i in range(50)))
    with pytest.raises(ConfigError, match="at least two"):
        load_task(data=path)


def test_test_label_unseen_in_training_is_rejected(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nx,0\ny,1\n")
    (tmp_path / "b.csv").write_text("text,label\nz,2\n")
    with pytest.raises(
        ConfigError, match=r"test labels \[2 \(int\)\] never occur .* are \[0 \(int\), 1 \(int\)\]"
    ):
        load_task(data=tmp_path / "a.csv", test_data=tmp_path / "b.csv")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("x")
    with pytest.raises(ConfigError, match="unsupported data file type"):
        load_task(data=path)


def test_test_data_without_data_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="needs --data"):
        load_task("rotten-tomatoes", test_data=tmp_path / "t.csv")


class FakeSplit:
    """The bits of a ``datasets.Dataset`` that ``load_hub_task`` reads."""

    def __init__(self, texts, labels):
        self.frame = pd.DataFrame({"sentence": texts, "label": labels})
        self.column_names = list(self.frame.columns)
        self.features = {}

    def __getitem__(self, column):
        return self.frame[column].tolist()

    def to_pandas(self):
        return self.frame.copy()


def test_a_hub_config_is_loaded_and_hidden_test_labels_fall_back_to_validation(monkeypatch):
    import types

    from fisherlora.experiments.tasks import load_hub_task

    calls = []

    def load_dataset(path, *config):
        calls.append((path, *config))
        return {
            "train": FakeSplit([f"train text {i}" for i in range(40)], [i % 2 for i in range(40)]),
            "validation": FakeSplit(  # two of its texts are training texts too
                [f"val text {i}" for i in range(8)] + ["train text 0", "train text 1"],
                [i % 2 for i in range(10)],
            ),
            "test": FakeSplit([f"test text {i}" for i in range(10)], [-1] * 10),  # hidden, as GLUE
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_hub_task("nyu-mll/glue:cola", text_column="sentence")
    assert calls == [("nyu-mll/glue", "cola")]
    assert not set(task.train_texts) & set(task.test_texts)
    assert len(task.test_texts) == 10 and len(task.train_texts) == 38
    assert set(task.test_labels) == {0, 1}
    load_hub_task("plain-name", text_column="sentence")
    assert calls[-1] == ("plain-name",)


def test_a_task_name_neither_built_in_nor_on_the_hub_lists_the_built_in_names(monkeypatch):
    import types

    from fisherlora.experiments.tasks import load_hub_task

    def load_dataset(path, *config):
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ConfigError) as err:
        load_hub_task("rotten-tomato")  # a typo
    for name in ("rotten-tomatoes", "imdb", "rotten-tomatoes-gen", "imdb-lm", "digits"):
        assert name in str(err.value)
    assert "doesn't exist on the Hub" in str(err.value)
