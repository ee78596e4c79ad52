"""The language-model demo from a script: exactly ``functrain demo`` (see functrain/demo.py).

    python examples/lm_demo.py                 # a 4-layer byte-level GPT-2, a few minutes on 2 CPU cores
    python examples/lm_demo.py --quick         # tiny settings: seconds
    python examples/lm_demo.py --output-dir runs/demo --max-steps 1200 --compile
    functrain demo ...                         # the same, as the installed console command

What it shows: a transformers ``GPT2LMHeadModel`` built from a config learns to write Python from
this machine's own standard library source (read as bytes: nothing is downloaded), trained by
the functrain ``Trainer`` with evaluation, checkpoints, a progress bar, ``metrics.jsonl`` and
TensorBoard logs. It ends by drawing the loss curves (``curves.png``), saving the model to
``OUTPUT_DIR/final`` (loads with ``AutoModelForCausalLM.from_pretrained``) and printing a
generated sample. Running it again with the same ``--output-dir`` resumes from the newest
checkpoint instead of starting over; a finished run is not retrained.
"""

from __future__ import annotations

import sys

from functrain.cli import main as functrain_main


def main(argv=None) -> int:
    return functrain_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
