"""FIM-LoRA + FILet + FW-LoRA inside a plain Hugging Face ``Trainer`` run, on the embedded default.

MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, LoRA r = 8 on query/key/value/dense, 120 steps of
batch 32; then accuracy on the held-out split and a stock PEFT adapter in ``OUT/adapter``.
Resume an interrupted run with ``--resume`` (checkpoints every 40 steps).

    python examples/trainer_minilm.py --out runs/trainer-example
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DataCollatorWithPadding, TrainingArguments

from fisherlora.experiments.models import load_model
from fisherlora.experiments.tasks import load_task
from fisherlora.integrations import FisherTrainer


class Encoded(torch.utils.data.Dataset):
    """Tokenised texts with their labels, padded later by the collator."""

    def __init__(self, texts, labels, tokenizer, max_length=128):
        self.encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.encodings["input_ids"][i], "labels": self.labels[i]}


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/trainer-example")
    parser.add_argument("--method", default="fim-lora+filet+fw-lora")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    task = load_task("rotten-tomatoes")
    base, tokenizer = load_model("minilm", num_labels=task.num_labels, seed=0)
    config = LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]
    )
    model = get_peft_model(base, config)
    trainer = FisherTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=128,
            learning_rate=5e-4,
            warmup_steps=round(0.06 * args.steps),
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            logging_steps=20,
            save_steps=40,
            report_to="none",
            seed=0,
        ),
        train_dataset=Encoded(task.train_texts, task.train_labels, tokenizer),
        eval_dataset=Encoded(task.test_texts, task.test_labels, tokenizer),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        fisher_method=args.method,
        fisher_options={"calib_batches": 8},
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    print(f"{args.method}: held-out accuracy {metrics['eval_accuracy']:.4f}")

    trainer.fisher.export(trainer.model, f"{args.out}/adapter")
    fresh, _ = load_model("minilm", num_labels=task.num_labels, seed=0)
    reloaded = PeftModel.from_pretrained(fresh, f"{args.out}/adapter")
    batch = DataCollatorWithPadding(tokenizer)([trainer.eval_dataset[i] for i in range(16)])
    trainer.model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        gap = (trainer.model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()
    print(f"stock PeftModel.from_pretrained on the untouched base: max |Δ logit| = {gap:.2e}")


if __name__ == "__main__":
    main()
