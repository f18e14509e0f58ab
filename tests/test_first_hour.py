"""Issue #16, "a newcomer's first hour": the traps a first user fell into, each pinned by a test.

1. ``save_pretrained`` after FILet writes the adapter for the untouched base.
2. Batches in the wrong format get an error that names the expected format.
3. A data file's dropped rows are counted, and too many are refused.
4. A run that collapses to one class says so.
5. Architectures without known LoRA targets get their attention and MLP linears.
6. ``load_task``'s splits come in a fixed shuffled order (slicing is safe).
7. Report cosmetics: wrapping command line, legend outside, readable cell text, titles.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    assert_unchanged,
    logits,
    random_batches,
    run_tiny,
    snapshot,
    tiny_base,
    tiny_lora_config,
    tiny_peft_model,
    train_a_few_steps,
)
from peft import PeftModel, get_peft_model

from fisherlora.adapters import raw_adapter_saves, resolve_targets
from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.methods import get_method
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import allocate_ranks

pytestmark = pytest.mark.filterwarnings("ignore:the calibration loader ran out")


# --- 1. save_pretrained after FILet ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_save_pretrained_after_filet_reproduces_the_model_on_the_untouched_base(arch, tmp_path):
    model = tiny_peft_model(arch, seed=2)
    filet_init(model, random_batches(3), progress=False)
    train_a_few_steps(model)
    probe = random_batches(2, seed=11)

    model.save_pretrained(tmp_path / "routed")  # the plain call a PEFT user makes
    saved = json.loads((tmp_path / "routed" / "adapter_config.json").read_text())
    assert set(saved["rank_pattern"].values()) == {16}  # [A; A0], [B, -B0]
    reloaded = PeftModel.from_pretrained(
        tiny_peft_model(arch, seed=2).unload(), tmp_path / "routed"
    )
    assert (logits(reloaded, probe) - logits(model, probe)).abs().max() <= 1e-5

    # what save_pretrained wrote before: PEFT's adapter for the residual base, another model
    PeftModel.save_pretrained(model, str(tmp_path / "raw"))
    raw = PeftModel.from_pretrained(tiny_peft_model(arch, seed=2).unload(), tmp_path / "raw")
    assert (logits(raw, probe) - logits(model, probe)).abs().max() > 1e-4


def test_raw_adapter_saves_write_peft_s_own_adapter_for_a_resume(tmp_path):
    model = tiny_peft_model(seed=2)
    filet_init(model, random_batches(2), progress=False)
    with raw_adapter_saves(model):
        model.save_pretrained(tmp_path / "checkpoint")
    saved = json.loads((tmp_path / "checkpoint" / "adapter_config.json").read_text())
    assert not saved.get("rank_pattern")  # rank r everywhere, as the model holds it
    model.save_pretrained(tmp_path / "export")  # routed again after the block
    saved = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert set(saved["rank_pattern"].values()) == {16}


def test_save_pretrained_refuses_a_second_conversion_and_leaves_plain_lora_alone(tmp_path):
    model = tiny_peft_model(seed=2)
    filet_init(model, random_batches(2), progress=False)
    with pytest.raises(ConfigError, match="already writes the adapter converted"):
        model.save_pretrained(tmp_path, path_initial_model_for_weight_conversion="init/")
    plain = tiny_peft_model(seed=2)
    allocate_ranks(plain, random_batches(2), progress=False)  # no residual: PEFT's save as is
    assert "save_pretrained" not in vars(plain)


def test_filet_init_twice_is_refused_and_the_save_still_reproduces_the_model(tmp_path):
    model = tiny_peft_model(seed=3)
    batches = random_batches(2, seed=4)
    filet_init(model, batches, progress=False)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already initialised by FILet"):
        filet_init(model, batches, progress=False)
    assert_unchanged(before, snapshot(model))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_peft_model(seed=3).unload(), tmp_path)
    torch.testing.assert_close(logits(reloaded, batches), logits(model, batches), atol=1e-5, rtol=0)


# --- 2. batch format -----------------------------------------------------------------------------


def as_lists(batches):
    return [list(b.values()) for b in batches]


def as_tuples(batches):  # what torch's default collate gives for a dataset of tuples
    return [tuple(b.values()) for b in batches]


@pytest.mark.parametrize("shape", [as_lists, as_tuples])
@pytest.mark.parametrize(
    "calibrate",
    [
        lambda model, batches: allocate_ranks(model, batches, progress=False),
        lambda model, batches: filet_init(model, batches, progress=False),
        lambda model, batches: get_method("fim-lora+filet+fw-lora", {"progress": False}).prepare(
            model, batches
        ),
    ],
    ids=["allocate_ranks", "filet_init", "composition"],
)
def test_batches_that_are_not_a_mapping_get_the_expected_format_named(shape, calibrate):
    model = tiny_peft_model()
    before = snapshot(model)
    with pytest.raises(CalibrationError, match=r"batch 0 is a (list|tuple) of 3 items; expected a"):
        calibrate(model, shape(random_batches(2)))
    assert_unchanged(before, snapshot(model))


def test_the_peers_calibration_names_the_format_too():
    base, targets = tiny_base("bert")
    with pytest.raises(CalibrationError, match=r"'input_ids'.*'attention_mask'.*'labels'"):
        get_method("lora-ga").build(base, tiny_lora_config(targets), as_tuples(random_batches(2)))
    eva = get_method("eva")
    model = eva.build(base, tiny_lora_config(targets))
    with pytest.raises(CalibrationError, match="batch 0 is a list of 3 items; expected a"):
        eva.prepare(model, as_lists(random_batches(2)))


def test_a_mapping_of_lists_names_the_keys_that_are_not_tensors():
    batch = {k: v.tolist() for k, v in random_batches(1)[0].items()}
    model = tiny_peft_model()
    with pytest.raises(CalibrationError, match=r"'input_ids': 'list'.*should be torch tensors"):
        filet_init(model, [batch], progress=False)


# --- 3. rows a data file loses -------------------------------------------------------------------


def write_lossy_csv(path, n=100, empty_texts=25, missing_labels=34, repeats=0):
    """``n`` rows: the first ``empty_texts`` without text, the next ``missing_labels`` without a
    label, then ``repeats`` repeating row ``n - 1``'s text."""
    rows = []
    for i in range(n):
        text = "" if i < empty_texts else f"review number {i}"
        label = "" if empty_texts <= i < empty_texts + missing_labels else str(i % 3)
        rows.append(f"{text},{label}")
    rows += [f"review number {n - 1},{(n - 1) % 3}"] * repeats
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_a_file_that_loses_too_many_rows_is_refused_with_the_counts(tmp_path):
    from fisherlora.experiments.tasks import load_file_task

    path = write_lossy_csv(tmp_path / "lossy.csv")
    message = r"dropped 59 of 100 rows \(59%\): 25 with an empty text, 34 without a label"
    with pytest.raises(ConfigError, match=message + r".*more than the 20% allowed"):
        load_file_task(path)


def test_dropped_rows_are_counted_on_stderr_when_allowed(tmp_path, capsys):
    from fisherlora.experiments.tasks import load_file_task, load_task

    path = write_lossy_csv(tmp_path / "lossy.csv", repeats=5)
    task = load_task(data=path, max_dropped_fraction=0.7)
    err = capsys.readouterr().err
    assert "dropped 64 of 105 rows (61%): 25 with an empty text, 34 without a label, 5 " in err
    assert err.count("\n") == 1  # one line
    assert sum(task.sizes().values()) == 41
    load_file_task(write_lossy_csv(tmp_path / "few.csv", empty_texts=2, missing_labels=1))
    assert "dropped 3 of 100 rows (3%): 2 with an empty text, 1 without a label" in (
        capsys.readouterr().err
    )
    load_file_task(write_lossy_csv(tmp_path / "clean.csv", empty_texts=0, missing_labels=0))
    assert capsys.readouterr().err == ""  # nothing dropped, nothing said


def test_the_cli_refuses_a_lossy_file_and_names_the_flag(tmp_path, capsys):
    path = write_lossy_csv(tmp_path / "lossy.csv")
    assert run_tiny(path, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "59 of 100 rows" in err and "--max-dropped-fraction 0.59" in err


def test_the_cli_flag_reaches_the_loader(tmp_path):
    from fisherlora.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--max-dropped-fraction", "0.6"])
    assert config_from_args(args).max_dropped_fraction == 0.6


# --- 4. a run that collapses to one class --------------------------------------------------------


def test_collapse_is_every_prediction_in_one_class_of_several_true_ones():
    from fisherlora.experiments.metrics import predictions_collapsed

    assert predictions_collapsed(np.array([[5, 0, 0], [3, 0, 0], [4, 0, 0]]))
    assert predictions_collapsed([[0, 7], [0, 2]])
    assert not predictions_collapsed(np.array([[5, 1], [3, 2]]))
    assert not predictions_collapsed(np.array([[5, 0], [0, 0]]))  # one true class: no sign
    assert not predictions_collapsed(None)  # language modelling: no matrix
    assert not predictions_collapsed(np.zeros((2, 2)))


@pytest.mark.parametrize("collapse", [True, False])
def test_a_collapsed_run_is_flagged_and_warned_about(
    collapse, small_csv, tmp_path, monkeypatch, capsys
):
    import fisherlora.experiments.task_kinds.classification as classification
    from fisherlora.experiments.metrics import classification_metrics

    real = classification.evaluate

    def forced(model, loader, num_labels, device):
        """The real evaluation, its confusion matrix forced to all-one-class or to perfect."""
        scores, confusion = real(model, loader, num_labels, device)
        forced = np.zeros_like(confusion)
        if collapse:
            forced[:, 1] = confusion.sum(axis=1)
        else:
            np.fill_diagonal(forced, confusion.sum(axis=1))
        return scores | classification_metrics(forced), forced

    monkeypatch.setattr(classification, "evaluate", forced)
    out = tmp_path / "run"
    assert run_tiny(small_csv, out, "--steps", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collapsed"] is collapse
    err = capsys.readouterr().err
    warned = "fisherlora: warning: the model predicts '1' for every held-out example"
    assert (warned in err) is collapse
    if collapse:
        assert "too few steps (2)" in err and "--lr" in err


# --- 5. default LoRA targets ----------------------------------------------------------------------


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    return DistilBertForSequenceClassification(config)


def tiny_mpnet():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return MPNetForSequenceClassification(config)


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return RobertaForSequenceClassification(config)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (tiny_distilbert, ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]),
        (tiny_mpnet, ["q", "k", "v", "o", "intermediate.dense", "output.dense"]),
        # BERT's names would put LoRA on RoBERTa's classifier.dense as well
        (tiny_roberta, ["query", "key", "value", "output.dense", "intermediate.dense"]),
    ],
    ids=["distilbert", "mpnet", "roberta"],
)
def test_an_unknown_architecture_gets_its_attention_and_mlp_linears(build, expected, capsys):
    from fisherlora.experiments.models import default_targets

    model = build()
    targets = default_targets(model)
    assert targets == expected
    chosen = resolve_targets(model, targets)
    assert len(chosen) == 12  # 6 per block, 2 blocks
    assert not any("classifier" in name or "pooler" in name for name in chosen)
    err = capsys.readouterr().err
    assert f"--targets {','.join(expected)}" in err and model.config.model_type in err
    peft_model = get_peft_model(model, tiny_lora_config(targets))  # PEFT takes them as they are
    peft_model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()


def test_a_known_architecture_keeps_its_names_quietly(capsys):
    from fisherlora.experiments.models import default_targets

    assert default_targets(tiny_base("bert")[0]) == ["query", "key", "value", "dense"]
    assert capsys.readouterr().err == ""


def test_a_target_that_matches_nothing_lists_the_linear_layers_by_suffix():
    with pytest.raises(ConfigError, match=r"'query' matches no module.*\['classifier', 'k_lin'"):
        resolve_targets(tiny_distilbert(), ["query"])


# --- 6. split order ------------------------------------------------------------------------------


def test_builtin_splits_are_shuffled_once_and_for_all():
    from fisherlora.experiments.tasks import load_task

    first, second = load_task("rotten-tomatoes"), load_task("rotten-tomatoes")
    assert set(first.train_labels[:512]) == {0, 1}
    assert 0.4 < sum(first.train_labels[:512]) / 512 < 0.6
    assert set(first.test_labels[:100]) == {0, 1}
    assert first.train_texts == second.train_texts and first.test_texts == second.test_texts
    assert first.sizes() == {"train": 6536, "test": 1994}


def test_a_file_s_order_does_not_depend_on_the_order_of_its_rows(tmp_path):
    from fisherlora.experiments.tasks import load_file_task

    rows = [f"review {i},{i // 50}" for i in range(100)]  # sorted by label, as the built-ins
    (tmp_path / "a.csv").write_text("text,label\n" + "\n".join(rows))
    (tmp_path / "b.csv").write_text("text,label\n" + "\n".join(reversed(rows)))
    a, b = load_file_task(tmp_path / "a.csv"), load_file_task(tmp_path / "b.csv")
    assert a.train_texts == b.train_texts and a.test_texts == b.test_texts
    assert set(a.train_labels[:10]) == {0, 1}


# --- 7. report cosmetics ---------------------------------------------------------------------------


def test_cell_text_is_white_on_dark_cells_and_black_on_light_ones():
    import matplotlib

    from fisherlora.experiments.plots import text_colour

    viridis, blues, diverging = (matplotlib.colormaps[n] for n in ("viridis", "Blues", "RdBu"))
    assert text_colour(viridis(0.0)) == "white"  # dark purple
    assert text_colour(viridis(1.0)) == "black"  # yellow
    assert text_colour(blues(1.0)) == "white" and text_colour(blues(0.0)) == "black"
    assert text_colour(diverging(0.0)) == "white" and text_colour(diverging(0.5)) == "black"
    assert text_colour((0, 0, 0, 1)) == "white" and text_colour((1, 1, 1)) == "black"


def test_module_values_plot_colours_each_cell_s_text_by_its_background(tmp_path, monkeypatch):
    import fisherlora.experiments.plots as plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    values = {f"model.layer.{i}.attention.query": float(i) for i in range(4)}
    plots.plot_module_values(values, tmp_path / "map.png", "t", "v")
    colours = [text.get_color() for text in figures[0].axes[0].texts]
    assert colours[0] == "white" and colours[-1] == "black"  # viridis: dark low, yellow high


def test_runtime_legend_sits_outside_the_bars(tmp_path, monkeypatch):
    import fisherlora.experiments.plots as plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    labels = ["lora", "eva", "fim-lora"]
    parts = {"calibration / init": [0, 300, 5], "training": [100, 90, 100], "evaluation": [9] * 3}
    plots.plot_runtime_bars(labels, parts, tmp_path / "runtime.png", "Where the time goes")
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # right of the plotting area, over no bar
    assert legend.x1 <= fig.bbox.x1  # and still inside the saved figure


def test_the_html_report_wraps_a_long_command_line(tmp_path):
    from fisherlora.experiments.report import _write_html

    command = "fisherlora compare " + " ".join(f"--flag-{i} value" for i in range(60))
    _write_html(tmp_path, command, "header", pd.DataFrame(), [], [])
    html = (tmp_path / "report.html").read_text()
    assert "pre{white-space:pre-wrap;overflow-wrap:anywhere}" in html
    assert f"<pre>{command}</pre>" in html


@pytest.mark.parametrize(
    ("name", "title"),
    [
        ("random-rank", "random-rank rank map"),
        ("random-rank+fw-lora", "random-rank+fw-lora rank map"),
    ],
)
def test_a_rank_map_is_titled_with_the_method_that_ran(name, title, tmp_path, monkeypatch):
    import fisherlora.experiments.plots as plots
    from fisherlora.experiments.method_plots import save_method_report

    titles = []
    monkeypatch.setattr(plots, "plot_module_values", lambda *a, **k: titles.append(a[2]))
    method = get_method(name, {"progress": False, "steps": 10})
    allocator = method.members[0] if hasattr(method, "members") else method
    allocator.prepare(tiny_peft_model(), [])  # random ranks need no calibration data
    assert [figure.title for figure in method.figures()] == [title]  # the method's data
    save_method_report(method, tmp_path)  # drawn by the experiments layer
    assert titles == [title]
