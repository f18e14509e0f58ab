"""What the causal LM's vocabulary head costs where only a few positions are read: SmolLM2-135M
(r = 8 on all seven projections) on Rotten Tomatoes as generation, the `cpu` suite's
``smollm2-rt-gen`` cell's shapes (batch 8, max_length 64; evaluation batch 16).

- training step (forward, backward, AdamW): the full pass against
  :func:`~fisherlora.logit_window.scored_window` (the head over the scored window);
- calibration (FIM-LoRA's per-example Fisher of B over ``--calib-batches`` batches): full
  passes against the head over the scored window (``capture.run_passes``);
- evaluation (the one-token choice scores of ``--eval-prompts`` validation prompts): the former
  path (prompt order, the head over every position) against ``_choice_scores`` (longest prompt
  first, :func:`~fisherlora.logit_window.logits_at_last_token`).

Interleaved (one of each in turn, so machine drift hits both alike), median over repetitions;
the ratios are new / former in the same run, and the results agree (largest |Δ| reported).

    python benchmarks/bench_causal_head.py --out benchmarks/results/causal_head.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from common import run_setting, write_results
from peft import LoraConfig, get_peft_model

from fisherlora import logit_window
from fisherlora.experiments.batching import PadPromptCompletion, PromptCompletionTexts, train_loader
from fisherlora.experiments.causal_models import load_causal_lm
from fisherlora.experiments.generation_eval import _choice_scores
from fisherlora.experiments.generation_tasks import as_generation_task
from fisherlora.experiments.models import default_targets
from fisherlora.experiments.tasks import load_task
from fisherlora.logit_window import scored_window
from fisherlora.methods.fim_lora import fisher_of_b


@contextlib.contextmanager
def full_head():
    """Every pass runs the head over every position (as before the window existed)."""
    real = logit_window.keeps_logits
    logit_window.keeps_logits = lambda model: False
    try:
        yield
    finally:
        logit_window.keeps_logits = real


@torch.no_grad()
def former_choice_scores(model, choices, tokenizer, prompts, max_length, batch_size):
    """The evaluation before the window: batches in prompt order, every position's logits."""
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    texts = PromptCompletionTexts(
        prompts,
        [choices[0]] * len(prompts),
        tokenizer,
        max_length,
        max_prompt_length=max_length - 1,
    )
    collate = PadPromptCompletion(tokenizer.pad_token_id)
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(
            [(texts[i][0][:-1], 0) for i in range(start, min(start + batch_size, len(prompts)))]
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = batch["attention_mask"].sum(dim=1) - 1
        at_last = logits[torch.arange(len(last)), last].float()
        scores.append(at_last.log_softmax(dim=-1)[:, choice_ids])
    return torch.cat(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per path and rep")
    parser.add_argument("--eval-prompts", type=int, default=96)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/causal_head.json")
    args = parser.parse_args()
    # now: run_setting records when the run started and the load average then
    setting = run_setting(args, model="smollm2-135m", task="rotten-tomatoes-gen", rank=8)
    task = as_generation_task(load_task("rotten-tomatoes"), "classify")
    base, tokenizer = load_causal_lm("smollm2-135m")
    config = LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=default_targets(base)
    )
    model = get_peft_model(base, config)
    pairs = PromptCompletionTexts(task.train_prompts, task.train_completions, tokenizer, 64)
    loader = train_loader(pairs, tokenizer.pad_token_id, 8, seed=0)
    batches = [b for _, b in zip(range(args.steps), loader, strict=False)]
    models = {"full": model, "window": copy.deepcopy(model)}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for name, m in models.items()
    }
    step_s: dict[str, list[float]] = {"full": [], "window": []}
    losses: dict[str, list[float]] = {"full": [], "window": []}
    for _ in range(args.reps):
        for batch in batches:
            for name, m in models.items():
                m.train()
                inputs = scored_window(m, batch) if name == "window" else batch
                start = time.perf_counter()
                loss = m(**inputs).loss
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                step_s[name].append(time.perf_counter() - start)
                losses[name].append(loss.item())
    calib_s: dict[str, list[float]] = {"full": [], "window": []}
    fishers = {}
    model.eval()
    for _ in range(args.reps):
        for name in ("full", "window"):
            with full_head() if name == "full" else contextlib.nullcontext():
                start = time.perf_counter()
                fishers[name], _ = fisher_of_b(
                    model, batches, n_batches=args.calib_batches, progress=False
                )
                calib_s[name].append(time.perf_counter() - start)
    prompts = task.test_prompts[: args.eval_prompts]  # validation-like prompts; no label is read
    model.eval()
    eval_s: dict[str, list[float]] = {"former": [], "window": []}
    for _ in range(args.reps):
        start = time.perf_counter()
        former = former_choice_scores(model, task.choices, tokenizer, prompts, 64, 16)
        eval_s["former"].append(time.perf_counter() - start)
        start = time.perf_counter()
        windowed = _choice_scores(
            model, task.choices, tokenizer, prompts, 64, 16, torch.device("cpu"), 0, 1
        )
        eval_s["window"].append(time.perf_counter() - start)
    step = {k: statistics.median(v) for k, v in step_s.items()}
    evaluation = {k: statistics.median(v) for k, v in eval_s.items()}
    calibration = {k: statistics.median(v) for k, v in calib_s.items()}
    result = {
        "median_step_s": step,
        "step_window_over_full": step["window"] / step["full"],
        "largest_loss_difference": max(
            abs(a - b) for a, b in zip(losses["full"], losses["window"], strict=True)
        ),
        "median_calibration_s": calibration,
        "calibration_window_over_full": calibration["window"] / calibration["full"],
        "largest_fisher_relative_difference": max(
            float((fishers["window"][m] - f).abs().max() / f.abs().max())
            for m, f in fishers["full"].items()
        ),
        "median_eval_s": evaluation,
        "eval_window_over_former": evaluation["window"] / evaluation["former"],
        "largest_score_difference": float((former - windowed).abs().max()),
    }
    print(result)
    write_results(args.out, setting, [result])


if __name__ == "__main__":
    main()
