"""Gradient statistics of a Hugging Face ``Trainer`` run: one callback, no change to the model.

    python examples/hf_trainer.py --epochs 2 --out runs/hf
    python examples/hf_trainer.py --max-steps 200 --save-every 50 --out runs/hf_steps

A tiny GPT-2 (2 layers, hidden size 32, built from a config: nothing is downloaded)
learns to continue counting sequences (``5 6 7 8 …`` modulo the vocabulary).
``BBDecoderCallback`` records every layer's gradient statistics at each optimizer step
(after ``Trainer`` clips them to ``max_grad_norm``), saves the charts, CSV and weight
histograms at each epoch end (or every ``--save-every`` steps) and writes ``report.html``
when training ends.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from BBDecoder.integrations.transformers import BBDecoderCallback

VOCAB, LENGTH = 32, 16


class CountingSequences(torch.utils.data.Dataset):
    """``start, start+1, …`` modulo ``VOCAB``: a next-token task a tiny model learns in seconds."""

    def __init__(self, samples: int) -> None:
        starts = torch.randint(0, VOCAB, (samples, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}  # the model shifts the labels itself


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hf", help="save_path of the analyzer")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=-1, help="train for this many optimizer steps instead")
    parser.add_argument("--save-every", type=int, default=None, help="save every N steps instead of every epoch")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    callback = BBDecoderCallback(args.out, save_every=args.save_every)  # Master_analyzer options go here too
    with tempfile.TemporaryDirectory() as scratch:  # Trainer's own output_dir (no checkpoints are saved)
        training = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,  # recorded once per optimizer step: the accumulated gradient
            learning_rate=1e-2,
            max_grad_norm=1.0,  # recorded after clipping (0 turns clipping off)
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=training, train_dataset=CountingSequences(args.samples), callbacks=[callback]
        )
        result = trainer.train()
    report = Path(args.out).resolve() / "report.html"
    print(
        f"{trainer.state.global_step} optimizer steps, final loss {result.training_loss:.3f}, "
        f"{time.perf_counter() - started:.0f} s; open the report: {report}"
    )
    return report


if __name__ == "__main__":
    main()
