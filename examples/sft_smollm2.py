"""FIM-LoRA + FILet + FW-LoRA inside TRL's ``SFTTrainer``, on the embedded causal LM SmolLM2-135M.

Rotten Tomatoes as prompt/completion pairs (the task ``rotten-tomatoes-gen``: ``"Review:
{text}\\nSentiment:"`` → ``" positive"`` / ``" negative"``), completion-only loss (SFTTrainer's
default for that format), LoRA r = 8 on every attention and MLP projection, 60 steps of 8 on 256
training pairs. Prints the held-out accuracy (the better-scoring class name as the completion)
and the completion NLL before and after training, then two checks:

- resume: a second run stopped after its checkpoint at step N/2 and resumed to N ends with the
  same adapter weights as the uninterrupted run;
- reload: the exported adapter, loaded with stock ``PeftModel.from_pretrained`` on a freshly
  loaded base model, gives the trained model's logits.

Needs the ``trl`` extra (``pip install -e ".[trl]"``; ``scripts/setup.sh`` installs it)::

    python examples/sft_smollm2.py --out runs/sft-example
    python examples/sft_smollm2.py --steps 20 --train-size 128 --eval-size 100   # quicker
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub import constants
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig

from fisherlora.adapters import lora_layers
from fisherlora.experiments.causal_models import load_causal_lm
from fisherlora.experiments.generation_eval import evaluate_choices
from fisherlora.experiments.generation_tasks import load_generation_task
from fisherlora.experiments.models import DEFAULT_TARGETS
from fisherlora.integrations import FisherSFTTrainer

MODEL = "smollm2-135m"


class StopAfter(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as a job killed right after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(args: argparse.Namespace, train_set: Dataset, out: Path) -> FisherSFTTrainer:
    """A fresh SmolLM2 with LoRA, in an SFTTrainer running the Fisher method."""
    base, tokenizer = load_causal_lm(MODEL, seed=0)
    targets = DEFAULT_TARGETS["llama"]  # every attention and MLP projection
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank, target_modules=targets
    )
    config = SFTConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=round(0.06 * args.steps),
        max_grad_norm=1.0,
        max_length=args.max_length,
        logging_steps=10,
        save_steps=max(1, args.steps // 2),
        report_to="none",
        disable_tqdm=True,
        seed=0,
        # SFTConfig's defaults are bf16 autocast and gradient checkpointing, made for GPUs;
        # float32 and no recomputation on a CPU (and for exact comparisons below)
        bf16=False,
        gradient_checkpointing=False,
    )
    return FisherSFTTrainer(
        model=get_peft_model(base, lora),
        args=config,
        train_dataset=train_set,
        processing_class=tokenizer,
        fisher_method=args.method,
        fisher_options={"calib_batches": args.calib_batches},
    )


def held_out(model, task, tokenizer, args, device) -> str:
    metrics, _ = evaluate_choices(
        model,
        task,
        tokenizer,
        max_length=args.max_length,
        batch_size=32,
        device=device,
        limit=args.eval_size,
    )
    return f"accuracy {metrics['accuracy']:.4f}, completion NLL {metrics['nll']:.4f}"


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sft-example")
    parser.add_argument("--method", default="fim-lora+filet+fw-lora")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=200, help="held-out pairs scored")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--no-checks", action="store_true", help="skip the resume/reload checks")
    args = parser.parse_args()
    constants.HF_HUB_DISABLE_TELEMETRY = True  # TRL's trainers report usage to the hub otherwise
    out = Path(args.out)
    start = time.perf_counter()

    task = load_generation_task("rotten-tomatoes-gen").subsample_train(args.train_size)
    train_set = Dataset.from_dict(
        {"prompt": task.train_prompts, "completion": task.train_completions}
    )
    base, tokenizer = load_causal_lm(MODEL, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"{MODEL}, {task.name}: {len(train_set)} training pairs, {args.steps} steps of "
        f"{args.batch_size}, {args.eval_size} held-out pairs"
    )
    print(f"before training: {held_out(base.to(device), task, tokenizer, args, device)}")
    del base

    trainer = make_trainer(args, train_set, out / "run")
    result = trainer.train()
    adapter, layers = lora_layers(trainer.model)
    ranks = [int(layer.r[adapter]) for layer in layers.values()]
    print(
        f"{args.method}: ranks {min(ranks)}..{max(ranks)} over {len(ranks)} modules "
        f"(LoRA: {args.rank} each); mean training loss {result.training_loss:.4f}"
    )
    device = trainer.args.device
    print(f"after training:  {held_out(trainer.model, task, tokenizer, args, device)}")
    trainer.fisher.export(trainer.model, out / "adapter")  # a stock PEFT adapter

    if not args.no_checks:
        # resume: stop a second run after its checkpoint at N/2, resume it in a new trainer
        half = max(1, args.steps // 2)
        interrupted = make_trainer(args, train_set, out / "resumed")
        interrupted.add_callback(StopAfter(half))
        interrupted.train()
        del interrupted
        resumed = make_trainer(args, train_set, out / "resumed")
        resumed.train(resume_from_checkpoint=True)
        ours, theirs = adapter_weights(trainer.model), adapter_weights(resumed.model)
        gap = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
        print(
            f"resume: stopped at step {half}, resumed to {resumed.state.global_step}: "
            f"max |Δ weight| against the uninterrupted run = {gap:.2e}"
        )
        del resumed

        # reload: the export applies to the original base weights (FILet's residual undone)
        fresh, _ = load_causal_lm(MODEL, seed=0)
        reloaded = PeftModel.from_pretrained(fresh, out / "adapter").to(device).eval()
        batch = next(iter(trainer.calibration_batches()))
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        trainer.model.eval()
        with torch.no_grad():
            gap = (trainer.model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()
        print(f"reload: stock PeftModel.from_pretrained on a fresh base: max |Δ logit| = {gap:.2e}")
    print(f"adapter in {out / 'adapter'}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
