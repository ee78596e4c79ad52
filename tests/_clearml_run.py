"""A training run reporting to ClearML in offline mode, in its own process (``Task.init`` hooks
the process it runs in: argparse, stdout, other frameworks). Writes the run's log_history to
``argv[1]``; ClearML's offline session lands in ``$CLEARML_CACHE_DIR/offline/``."""

import json
import sys

from functrain.trainer.args import TrainingArguments
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model

if __name__ == "__main__":
    out = sys.argv[1]
    args = TrainingArguments(out, max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=2,
                             eval_strategy="steps", eval_steps=3, save_strategy="no", disable_tqdm=True, seed=3,
                             report_to="clearml", hub_token="hf_secret_token")
    trainer = Trainer(model=make_model(), args=args, train_dataset=make_dataset(),
                      eval_dataset=make_dataset(n=8, seed=5))
    trainer.train()
    with open(f"{out}/log_history.json", "w") as f:
        json.dump(trainer.state.log_history, f)
