"""A few steps on the embedded default: the real MiniLM and real Rotten Tomatoes sentences."""

import json

import pytest
import torch
from peft import PeftModel

from fisherlora.experiments.models import load_model
from fisherlora.experiments.train import TrainConfig, train

pytestmark = pytest.mark.integration


def test_minilm_trains_a_few_steps_on_rotten_tomatoes_and_reloads(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        task="rotten-tomatoes",
        model="minilm",
        method="lora",
        rank=4,
        steps=4,
        batch_size=8,
        max_length=32,
        eval_every=0,
        device="cpu",
        out=str(out),
    )
    result = train(config, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion_matrix"])) == 1994  # the whole held-out split
    assert metrics["class_names"] == ["negative", "positive"]
    # 6 layers x (query, key, value, attention.output.dense: 384x384; intermediate.dense,
    # output.dense: 384x1536) + pooler.dense, each costing r x (in + out)
    assert metrics["adapter_params"] == 6 * 4 * (4 * 768 + 2 * 1920) + 4 * 768

    base, tokenizer = load_model("minilm", 2, seed=123)  # another head seed: the adapter carries it
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    batch = tokenizer(
        ["a gripping, funny film", "dull and lifeless"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-5
        )
