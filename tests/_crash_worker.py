"""Run by test_trainer_crash.py: train (resuming if possible) and write the final params."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _trainer_fixtures import make_dataset, make_model  # noqa: E402
from functrain.io import checkpoint as ck  # noqa: E402
from functrain.trainer.callbacks import TrainerCallback  # noqa: E402
from functrain.trainer.trainer import Trainer  # noqa: E402
from functrain.trainer.args import TrainingArguments  # noqa: E402


class NoisyCollator:
    """A random collator: input noise from torch's global generator (as augmentations draw it)."""

    def __call__(self, features):
        from functrain.data.collators import default_data_collator

        batch = default_data_collator(features)
        batch["x"] = batch["x"] + 0.1 * torch.randn(batch["x"].shape)
        return batch


class Beacon(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        print(f"step {state.global_step}", flush=True)


def main(out, result_file, mode="steps"):
    # "steps": a checkpoint every step; "epoch": save_strategy="epoch" over 2-step epochs.
    saves = dict(save_steps=1) if mode == "steps" else dict(save_strategy="epoch")
    args = TrainingArguments(out, per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=16,
                             learning_rate=5e-2, weight_decay=0.01, logging_steps=3, save_total_limit=3,
                             report_to="none", disable_tqdm=True, seed=3, **saves)
    data = make_dataset(n=40 if mode == "steps" else 12)
    trainer = Trainer(model=make_model(), args=args, train_dataset=data, data_collator=NoisyCollator(),
                      callbacks=[Beacon()])
    resume = ck.find_resumable_checkpoint(out) is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, result_file)
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
