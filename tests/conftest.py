"""Shared fixtures: a learnable toy task and tiny random models built from configs."""

from __future__ import annotations

import contextlib
import copy
import os
import random

import pytest
import torch

from fisherlora.experiments.tasks import Task

POSITIVE = ["good", "great", "excellent", "wonderful", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor"]
FILLER = ["the", "movie", "was", "plot", "and", "actors", "story", "film", "it", "a"]


def keyword_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Sentences whose label is decided by one sentiment word hidden among filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    while len(texts) < n:
        label = rng.randrange(2)
        words = [*rng.sample(FILLER, 6), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        text = " ".join(words)
        if text not in texts:
            texts.append(text)
            labels.append(label)
    return texts, labels


@pytest.fixture
def small_csv(tmp_path):
    """A 60-row CSV a tiny model can train on for a few steps."""
    path = tmp_path / "reviews.csv"
    rows = [f"review {i} {'good' if i % 2 else 'bad'},{i % 2}" for i in range(60)]
    path.write_text("text,label\n" + "\n".join(rows))
    return path


def run_tiny(data, out, *extra: str) -> int:
    """``fisherlora train`` on tiny-bert with ``data``, a few cheap settings and ``extra`` flags."""
    from fisherlora.cli import main

    common = ["--model", "tiny-bert", "--batch-size", "8", "--eval-every", "0", "--no-progress"]
    return main(
        ["train", *common, "--device", "cpu", "--data", str(data), "--out", str(out), *extra]
    )


@pytest.fixture(scope="session")
def keyword_task() -> Task:
    train_texts, train_labels = keyword_texts(512, seed=0)
    test_texts, test_labels = keyword_texts(128, seed=1)
    return Task(
        "keywords", train_texts, train_labels, test_texts, test_labels, ["negative", "positive"]
    )


def tiny_base(arch: str = "bert", seed: int = 0):
    """A random hidden-32 BERT- or Llama-style classifier (``"causal"``: a Llama causal LM) and
    its LoRA targets (every linear)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(seed)
    if arch == "bert":
        config = BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
            hidden_dropout_prob=0.1,
        )
        return BertForSequenceClassification(config), ["query", "key", "value", "dense"]
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_labels=2,
        pad_token_id=0,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if arch == "causal":  # a causal LM of the same shape (no classification head)
        return LlamaForCausalLM(config), targets
    return LlamaForSequenceClassification(config), targets


def tiny_lora_config(targets, rank: int = 8, rslora: bool = False, **lora):
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        use_rslora=rslora,
        **lora,
    )


def tiny_peft_model(
    arch: str = "bert", *, rank: int = 8, seed: int = 0, rslora: bool = False, **lora
):
    """A random hidden-32 BERT- or Llama-style classifier with LoRA on every linear target."""
    from peft import get_peft_model

    base, targets = tiny_base(arch, seed)
    return get_peft_model(base, tiny_lora_config(targets, rank, rslora, **lora))


def random_batches(
    n: int, batch_size: int = 4, seq: int = 12, seed: int = 0, pad_to: int | None = None
):
    """Token batches with right padding (ids 1..99, pad 0) and binary labels."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(seq // 2, seq + 1, (batch_size,), generator=g)
        width = pad_to or seq
        ids = torch.randint(1, 100, (batch_size, width), generator=g)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batches.append(
            {
                "input_ids": ids * mask,
                "attention_mask": mask,
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }
        )
    return batches


def logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                for b in batches
            ]
        )


def lora_bookkeeping(model) -> dict:
    """What sizes and scales the adapters besides their tensors: each LoRA layer's ``r``,
    ``lora_alpha`` and ``scaling`` per adapter, and (on a PeftModel, or any model holding a
    ``peft_config``) every adapter's config as a dict, ``rank_pattern`` and ``alpha_pattern``
    included. Deep copies: an in-place change of a pattern dict must not change the snapshot."""
    from peft.tuners.lora import LoraLayer

    layers = {
        name: {key: copy.deepcopy(dict(getattr(m, key))) for key in ("r", "lora_alpha", "scaling")}
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    configs = getattr(model, "peft_config", None)
    configs = {} if not isinstance(configs, dict) else configs
    return {
        "layers": layers,
        "configs": {a: copy.deepcopy(c.to_dict()) for a, c in configs.items()},
    }


def snapshot(model):
    """Everything calibration must leave alone: weights, buffers, flags, modes, grads, hooks,
    attributes, and the LoRA bookkeeping (ranks, scalings, rank/alpha patterns)."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grads": {n for n, p in model.named_parameters() if p.grad is not None},
        "hooks": sum(
            len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
            for m in model.modules()
        ),
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "lora": lora_bookkeeping(model),
    }


def assert_unchanged(before, after):
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys(), key
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), name
    for key in ("requires_grad", "training", "grads", "hooks", "attributes"):
        assert before[key] == after[key], key
    assert before["lora"]["layers"] == after["lora"]["layers"], "LoRA ranks, alphas or scalings"
    assert before["lora"]["configs"] == after["lora"]["configs"], "peft_config"


def free_port() -> int:
    """A TCP port on localhost nobody listens on (for a test's process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int = 2):
    """This spawned process in a gloo process group of ``world`` on ``port``, left on exit."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_processes(target, world: int = 2) -> dict:
    """Run ``target(rank, port, queue)`` in ``world`` spawned processes (a gloo group on a free
    port); what each put on the queue as ``(rank, value)``, by rank, once every process has
    exited with code 0."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=target, args=(r, port, queue)) for r in range(world)]
    for process in processes:
        process.start()
    results = dict(queue.get() for _ in range(world))
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    return results


def train_a_few_steps(model, seed: int = 5, steps: int = 3) -> None:
    """A few AdamW steps on random batches, so that adapters move away from their init."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in random_batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
