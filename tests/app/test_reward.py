import json

import numpy as np
import pytest
import torch
from tiny import tiny_tokenizer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from minippo.app import model_folders as models
from minippo.app.data import load_imdb
from minippo.app.reward import (
    HFSentiment,
    RewardConfig,
    TfidfSentiment,
    find_positive_index,
    load_reward,
    train_reward,
)

# -- TF-IDF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imdb_small(imdb_dir):
    train = load_imdb("train", imdb_dir, limit=3000, seed=0)
    val = load_imdb("validation", imdb_dir, limit=400, seed=0)
    return train, val


@pytest.fixture(scope="module")
def fitted(imdb_small):
    train, _ = imdb_small
    vectorizer, clf = TfidfSentiment.fit_sklearn(train["text"], train["label"], min_df=2)
    return vectorizer, clf, TfidfSentiment.from_sklearn(vectorizer, clf)


def test_scorer_equals_sklearn_on_held_out_texts(imdb_small, fitted):
    _, val = imdb_small
    vectorizer, clf, reward = fitted
    texts = list(val["text"]) + ["", "!!!", "Great great GREAT film<br />", "the the the"]
    features = vectorizer.transform(texts)
    ours = reward.decision_function(texts)
    np.testing.assert_allclose(ours, clf.decision_function(features), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        reward.probability(texts).numpy(), clf.predict_proba(features)[:, 1], atol=1e-6
    )
    assert reward.probability(texts).dtype == torch.float32


def test_accuracy_clearly_above_chance(imdb_small, fitted):
    _, val = imdb_small
    *_, reward = fitted
    assert reward.accuracy(val["text"], val["label"]) > 0.8


def test_kind_prob_and_logit(fitted):
    *_, reward = fitted
    texts = [
        "A wonderful, moving film. Brilliant acting.",
        "Awful. A waste of time, boring and bad.",
    ]
    logits = reward.logit(texts)
    reward.kind = "prob"
    assert torch.allclose(reward(texts), torch.sigmoid(logits))
    assert reward(texts)[0] > 0.5 > reward(texts)[1]
    reward.kind = "logit"
    assert torch.equal(reward(texts), logits)
    reward.kind = "prob"
    with pytest.raises(TypeError, match="list of texts"):
        reward("a single string")


def test_save_load_round_trip_is_plain_data(tmp_path, imdb_small, fitted):
    _, val = imdb_small
    *_, reward = fitted
    reward.save(tmp_path / "rw")
    files = sorted(p.name for p in (tmp_path / "rw").iterdir())
    assert files == ["config.json", "vocabulary.json", "weights.safetensors"]
    for name in ("config.json", "vocabulary.json"):
        json.loads((tmp_path / "rw" / name).read_text())
    with open(
        tmp_path / "rw" / "weights.safetensors", "rb"
    ) as f:  # a safetensors header, no pickle
        header_len = int.from_bytes(f.read(8), "little")
        assert set(json.loads(f.read(header_len))) >= {"idf", "coef", "intercept"}
    loaded = load_reward(tmp_path / "rw")
    assert isinstance(loaded, TfidfSentiment) and loaded.kind == "prob"
    np.testing.assert_array_equal(
        loaded.decision_function(val["text"][:50]), reward.decision_function(val["text"][:50])
    )
    assert load_reward(tmp_path / "rw", kind="logit").kind == "logit"


def test_load_rejects_other_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"type": "something-else"}))
    with pytest.raises(ValueError, match="not a minippo TF-IDF"):
        TfidfSentiment.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_reward(tmp_path / "empty")


def test_train_reward_step(tmp_path, imdb_dir):
    out = tmp_path / "reward"
    result = train_reward(
        RewardConfig(
            data_dir=str(imdb_dir), output_dir=str(out), num_train=2000, num_eval=300, min_df=2
        )
    )
    m = result["metrics"]
    assert result["path"] == str(out)
    assert m["num_train"] == 2000 and m["num_validation"] == 300 and m["validation_accuracy"] > 0.75
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["validation_accuracy"] == m["validation_accuracy"]
    assert load_reward(out).metrics["validation_accuracy"] == m["validation_accuracy"]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("kind", "score", "unknown reward kind"),
        ("num_train", 1, "num_train"),
        ("max_df", 1.5, "max_df"),
        ("logreg_c", 0.0, "logreg_c"),
        ("min_df", 0, "min_df"),
    ],
)
def test_reward_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**{field: value})


def test_kind_pairwise_is_the_pairwise_reward_model():
    config = RewardConfig(kind="pairwise")
    assert (config.model, config.kind) == ("pairwise", "logit")
    with pytest.raises(ValueError, match="--kind pairwise trains a pairwise reward model"):
        RewardConfig(model="distilbert-imdb", kind="pairwise")


# -- Hugging Face classifiers ------------------------------------------------------------------------


def _save_classifier(path, arch="distilbert", id2label=None):
    tok = tiny_tokenizer()
    id2label = id2label or {0: "NEGATIVE", 1: "POSITIVE"}
    common = dict(
        vocab_size=len(tok),
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    if arch == "distilbert":
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                dim=32,
                n_layers=1,
                n_heads=2,
                hidden_dim=64,
                dropout=0.0,
                seq_classif_dropout=0.0,
                **common,
            )
        )
    else:
        model = BertForSequenceClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                hidden_dropout_prob=0.0,
                **common,
            )
        )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval(), tok


TEXTS = [
    "This movie was great, I loved it.",
    "Terrible.",
    "A wonderful, moving picture with a brilliant cast!",
]


def test_hf_sentiment_truncates_to_the_model_context(tmp_path):
    _save_classifier(tmp_path)  # 64 positions
    reward = HFSentiment(tmp_path)
    assert reward.max_length == 64
    assert reward(["A wonderful film. " * 100]).shape == (1,)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_hf_sentiment_scores_positive_class(tmp_path, arch):
    model, tok = _save_classifier(tmp_path, arch)
    with torch.no_grad():  # one text at a time, no padding: the reference
        ref = torch.cat(
            [model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits for t in TEXTS]
        )
    reward = load_reward(
        tmp_path, batch_size=2
    )  # HF default kind: the raw logit (the blog's reward)
    assert isinstance(reward, HFSentiment) and reward.kind == "logit" and reward.positive_index == 1
    scores = reward(TEXTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        HFSentiment(tmp_path, kind="prob")(TEXTS), ref.softmax(-1)[:, 1], atol=1e-5, rtol=1e-5
    )
    assert 0.0 <= reward.accuracy(TEXTS, [1, 0, 1]) <= 1.0


def test_hf_sentiment_positive_label_override(tmp_path):
    _save_classifier(tmp_path, id2label={0: "pos", 1: "neg"})
    assert HFSentiment(tmp_path).positive_index == 0
    assert HFSentiment(tmp_path, positive_label="neg").positive_index == 1
    assert HFSentiment(tmp_path, positive_label=1).positive_index == 1
    with pytest.raises(ValueError, match="not one of the model's labels"):
        HFSentiment(tmp_path, positive_label="POSITIVE")


def test_find_positive_index():
    assert find_positive_index({0: "NEGATIVE", 1: "POSITIVE"}, 2) == 1
    assert find_positive_index({0: "LABEL_0", 1: "LABEL_1"}, 2) == 1
    assert find_positive_index({0: "LABEL_0"}, 1) == 0
    with pytest.raises(ValueError, match="positive_label"):
        find_positive_index({0: "a", 1: "b", 2: "c"}, 3)


def test_load_reward_unknown_name_offline(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError) as err:
        load_reward("someone/no-such-sentiment-model")
    message = str(err.value)
    assert "someone/no-such-sentiment-model" in message and "unreachable" in message
    assert "minippo reward" in message
