"""Step 2 of the blog (merge_peft_adapter.py): merge the SFT adapter into the base model's weights
and save a plain transformers model, then check that it gives the adapted model's logits.

    python examples/02_merge_adapter.py --adapter runs/sft/adapter --output-dir runs/merged
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from minippo import load_adapter, load_model, merge_lora
from minippo.app import load_tokenizer, resolve_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-model", default="smollm2-135m", help="base model folder or name")
    parser.add_argument("--adapter", default="runs/sft/adapter", help="adapter folder")
    parser.add_argument("--output-dir", default="runs/merged", help="where the merged model goes")
    args = parser.parse_args()

    base = resolve_model(args.base_model)
    tokenizer = load_tokenizer(base)
    model = load_model(base)  # float weights: the merge is exact
    load_adapter(model, args.adapter)  # adds LoRA layers from adapter_config.json
    probe = tokenizer(["This movie was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(probe).logits
    merged = merge_lora(model)  # W + scaling * B @ A, plain nn.Linear layers
    merged.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    plain = AutoModelForCausalLM.from_pretrained(args.output_dir)  # no minippo needed
    with torch.no_grad():
        diff = (plain(probe).logits - adapted).abs().max().item()
    print(
        f"merged model in {args.output_dir}; max |logit difference| vs the adapted model: {diff:.2e}"
    )
