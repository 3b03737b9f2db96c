"""Step 1 of the blog (clm_finetune_peft_imdb.py): LoRA fine-tuning of an 8-bit model on IMDB reviews.

    python examples/01_sft_imdb.py --data-dir ../shared/data/imdb --max-steps 50

Every flag is a field of `minippo.app.SFTConfig` (see `minippo sft --help`).
"""

import argparse

from minippo.app import SFTConfig, run_sft
from minippo.app.cli import add_dataclass_arguments, config_from_namespace

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, SFTConfig)
    metrics = run_sft(config_from_namespace(SFTConfig, parser.parse_args()))
    print(f"adapter saved to {metrics['adapter']}")
