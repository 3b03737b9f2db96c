import json

import pytest

from minippo import LoRAConfig, load_adapter
from minippo.app.sft import SFTConfig, lr_lambda, review_blocks, run_sft
from minippo.quant import load_model


def _config(tiny_model_dir, imdb_dir, tmp_path, **overrides):
    settings = dict(
        model=tiny_model_dir,
        data_dir=str(imdb_dir),
        output_dir=str(tmp_path / "sft"),
        load_in_8bit=True,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
        block_size=32,
        batch_size=8,
        max_steps=20,
        learning_rate=1e-2,
        warmup_steps=2,
        num_train_texts=40,
        num_eval_blocks=8,
        log_every=5,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def test_sft_loss_drops_and_adapter_loads(tiny_model_dir, imdb_dir, tmp_path):
    config = _config(tiny_model_dir, imdb_dir, tmp_path)
    m = run_sft(config)
    # A random tiny model starts at ~ln(384) = 5.95 nats; its LoRA reaches ~5.84 (the byte-level
    # unigram floor of IMDB text under the tiny tokenizer) within 10 steps.
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1
    assert m["eval_ppl_after"] < m["eval_ppl_before"]
    assert 0 < m["trainable_params"] < m["total_params"]
    out = tmp_path / "sft"
    log = json.loads((out / "loss_log.json").read_text())
    assert [s for s, _ in log] == list(range(1, 21))
    assert sum(l for _, l in log[-5:]) < sum(l for _, l in log[:5])
    assert json.loads((out / "metrics.json").read_text())["eval_loss_after"] == m["eval_loss_after"]
    assert json.loads((out / "sft_config.json").read_text())["max_steps"] == 20

    # The saved adapter on a fresh 8-bit base reproduces the trained model's validation loss.
    model = load_model(tiny_model_dir, load_in_8bit=True)
    load_adapter(model, m["adapter"])
    from minippo.app.model_folders import load_tokenizer
    from minippo.app.sft import eval_blocks, evaluate_lm

    val = eval_blocks(load_tokenizer(tiny_model_dir), config)
    assert evaluate_lm(model, val, 8, "cpu") == pytest.approx(m["eval_loss_after"], abs=1e-3)


def test_sft_float_base_with_grad_accumulation(tiny_model_dir, imdb_dir, tmp_path):
    m = run_sft(
        _config(
            tiny_model_dir,
            imdb_dir,
            tmp_path,
            load_in_8bit=False,
            grad_accum_steps=2,
            max_steps=4,
            num_eval_blocks=0,
            lora=LoRAConfig(r=4, alpha=8),
        )
    )
    assert "eval_loss_before" not in m and m["steps"] == 4
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_block_larger_than_context_is_refused(tiny_model_dir, imdb_dir, tmp_path):
    with pytest.raises(ValueError, match="context window of 128"):
        run_sft(_config(tiny_model_dir, imdb_dir, tmp_path, block_size=256))


def test_review_blocks_are_cleaned(tokenizer):
    blocks = review_blocks(["Great film.<br /><br />Loved it. " * 4] * 3, tokenizer, 16)
    text = tokenizer.decode(blocks.flatten())
    assert "<br" not in text and text.count(tokenizer.eos_token) >= 2


def test_lr_schedule_warmup_then_linear_decay():
    f = lr_lambda(warmup_steps=2, max_steps=10)
    assert [f(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("block_size", 1, "block_size"),
        ("grad_accum_steps", 3, "must divide"),
        ("learning_rate", 0.0, "learning_rate"),
        ("dtype", "int8", "unknown dtype"),
        ("device", "gpu", "not a device"),
        ("max_steps", 0, "max_steps"),
    ],
)
def test_sft_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**{field: value})
