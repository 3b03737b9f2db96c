"""Step 1 of the blog (clm_finetune_peft_imdb.py): LoRA fine-tuning of an 8-bit model on IMDB reviews.

    python examples/01_sft_imdb.py --data-dir ../shared/data/imdb --max-steps 50

Every flag is a field of `minippo.app.SFTConfig` (see `minippo sft --help`).
"""

import sys

from minippo.app import SFTConfig, run_sft
from minippo.app.cli import parse_config

if __name__ == "__main__":
    metrics = run_sft(parse_config(SFTConfig, sys.argv[1:], description=__doc__))
    print(f"adapter saved to {metrics['adapter']}")
