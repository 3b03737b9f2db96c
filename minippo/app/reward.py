"""Sentiment rewards: a score of how positive a text is, for PPO.

- `TfidfSentiment`, the offline default: TF-IDF over word 1-2 grams + logistic regression, trained
  with scikit-learn on IMDB train (time and accuracy: the README's demo table). Saved as plain data
  (vocabulary JSON, idf/coef/intercept safetensors, config JSON), so loading a reward file cannot
  run code, and scored by our own batched NumPy code, so scoring needs no scikit-learn.
- `HFSentiment`: any Hugging Face sequence-classification model (the blog's
  `lvwerra/distilbert-imdb`), scoring the positive class.
- `PairwiseSentiment`: a pairwise reward model (`minippo.reward_model`, trained by `minippo reward
  --model pairwise`, app/pairwise.py), its score calibrated into log-odds of a positive review; on
  PPO's own model it is a second adapter on the same weights.
- `load_reward(spec)`: any of them, from a folder or a hub name; a folder that holds no trained reward
  (a causal LM, an adapter alone, a classifier whose head would be initialised at random) is refused.

Both score a list of B texts as a float tensor (B,), `kind` "prob" (P(positive)) or "logit".
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checks import POSITIVE, POSITIVE_INT, check_device, check_fields, optional
from ..fileio import atomic_directory, write_json
from ..reward_model import REWARD_MODEL_FILE, RewardModel, read_reward_config
from .data import clean_review, load_imdb
from .pairwise import PairwiseConfig

TFIDF_TYPE = "minippo-tfidf-sentiment"
TFIDF_FORMAT = 1
KINDS = ("prob", "logit")
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default word pattern


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; choose one of {KINDS}")
    return kind


def _preprocess(text: str) -> str:
    """What both the vectoriser and our scorer see: the cleaned, lower-cased review."""
    return clean_review(text).lower()


class _Scorer:
    """Shared by both rewards: `__call__` returns `probability` or `logit` according to `kind`."""

    kind: str

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Scores (B,) float32: P(positive) for kind "prob", the positive logit for "logit"."""
        return self.probability(texts) if self.kind == "prob" else self.logit(texts)

    def scores_and_probabilities(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the scores `__call__` gives, P(positive)), both (B,) float32, from one pass over the texts."""
        logits = self.class_logits(texts)
        probs = self._probability(logits)
        return (probs if self.kind == "prob" else self._logit(logits)), probs

    def logit(self, texts: Sequence[str]) -> torch.Tensor:
        """The positive class's logit (TF-IDF: the log-odds), (B,) float32."""
        return self._logit(self.class_logits(texts))

    def probability(self, texts: Sequence[str]) -> torch.Tensor:
        """P(positive), (B,) float32."""
        return self._probability(self.class_logits(texts))

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Fraction of texts where P(positive) > 0.5 matches the label (1 = positive)."""
        pred = self.probability(texts) > 0.5
        return float((pred == torch.as_tensor(list(labels)).bool()).float().mean())


# -- TF-IDF + logistic regression ----------------------------------------------------------------


class TfidfSentiment(_Scorer):
    """Logistic regression on sublinear TF-IDF word n-grams, scored without scikit-learn.

    For a text: lower-case, tokenise with `TOKEN_PATTERN`, count the vocabulary's n-grams,
    tf = 1 + log(count), x = tf * idf / ||tf * idf||_2, logit = coef . x + intercept.
    This is exactly scikit-learn's `TfidfVectorizer(sublinear_tf=True, norm="l2")` followed by
    `LogisticRegression.decision_function` (tested against it).
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: float,
        ngram_range: tuple[int, int] = (1, 2),
        sublinear_tf: bool = True,
        token_pattern: str = TOKEN_PATTERN,
        kind: str = "prob",
        metrics: dict | None = None,
    ):
        self.vocabulary = list(vocabulary)
        self.index = {term: i for i, term in enumerate(self.vocabulary)}
        self.idf = np.asarray(idf, dtype=np.float64)  # (F,)
        self.coef = np.asarray(coef, dtype=np.float64).reshape(-1)  # (F,)
        self.intercept = float(intercept)
        if not len(self.vocabulary) == len(self.idf) == len(self.coef):
            raise ValueError(
                f"vocabulary ({len(self.vocabulary)}), idf ({len(self.idf)}) and coef "
                f"({len(self.coef)}) must have one entry per feature"
            )
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.sublinear_tf = bool(sublinear_tf)
        self.token_pattern = token_pattern
        self._token_re = re.compile(token_pattern)
        self.kind = _check_kind(kind)
        self.metrics = dict(metrics or {})

    # -- training (scikit-learn only here) --

    @staticmethod
    def fit_sklearn(
        texts: Sequence[str],
        labels: Sequence[int],
        ngram_max: int = 2,
        min_df: int = 3,
        max_df: float = 0.9,
        max_features: int | None = None,
        C: float = 4.0,
    ):
        """Fit scikit-learn's TfidfVectorizer + LogisticRegression; returns (vectorizer, clf)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        vectorizer = TfidfVectorizer(
            preprocessor=_preprocess,
            token_pattern=TOKEN_PATTERN,
            ngram_range=(1, ngram_max),
            sublinear_tf=True,
            min_df=min_df,
            max_df=max_df,
            max_features=max_features,
            dtype=np.float64,
        )
        features = vectorizer.fit_transform(list(texts))
        clf = LogisticRegression(C=C, solver="liblinear", max_iter=1000)
        clf.fit(features, np.asarray(labels))
        if list(clf.classes_) != [0, 1]:
            raise ValueError(
                f"labels must be 0 (negative) and 1 (positive), got {list(clf.classes_)}"
            )
        return vectorizer, clf

    @classmethod
    def from_sklearn(cls, vectorizer, clf, kind: str = "prob", metrics: dict | None = None):
        """Copy the arrays out of a fitted (TfidfVectorizer, LogisticRegression) pair."""
        if not (
            vectorizer.preprocessor is _preprocess
            and vectorizer.analyzer == "word"
            and vectorizer.sublinear_tf
            and vectorizer.use_idf
            and vectorizer.norm == "l2"
        ):
            raise ValueError(
                "from_sklearn takes the vectorizer made by fit_sklearn (preprocessor "
                "_preprocess, word analyzer, sublinear tf, idf, l2 norm)"
            )
        vocabulary = [None] * len(vectorizer.vocabulary_)
        for term, i in vectorizer.vocabulary_.items():
            vocabulary[i] = term
        return cls(
            vocabulary,
            vectorizer.idf_,
            clf.coef_[0],
            clf.intercept_[0],
            ngram_range=vectorizer.ngram_range,
            token_pattern=vectorizer.token_pattern,
            kind=kind,
            metrics=metrics,
        )

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], kind: str = "prob", **kwargs):
        """Train on (texts, labels) with `fit_sklearn(**kwargs)`; returns a TfidfSentiment."""
        return cls.from_sklearn(*cls.fit_sklearn(texts, labels, **kwargs), kind=kind)

    # -- scoring (our code) --

    def _ngrams(self, tokens: list[str]) -> list[str]:
        lo, hi = self.ngram_range
        grams = list(tokens) if lo == 1 else []
        for n in range(max(lo, 2), hi + 1):
            grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        return grams

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Logits (B,) float64 for a batch of texts, all texts vectorised at once."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        F = len(self.vocabulary)
        # 1. (text, feature) pairs of every known n-gram occurrence.
        rows, cols = [], []
        for b, text in enumerate(texts):
            ids = [
                self.index[g]
                for g in self._ngrams(self._token_re.findall(_preprocess(text)))
                if g in self.index
            ]
            rows.extend([b] * len(ids))
            cols.extend(ids)
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        # 2. Term counts per (text, feature): unique pairs and their multiplicities.
        pairs, counts = np.unique(rows * F + cols, return_counts=True)  # (K,), K nonzeros
        r, c = pairs // F, pairs % F
        tf = 1.0 + np.log(counts) if self.sublinear_tf else counts.astype(np.float64)
        # 3. TF-IDF weights, l2-normalised per text; the logit is their dot with coef.
        w = tf * self.idf[c]
        norm = np.sqrt(np.bincount(r, weights=w * w, minlength=len(texts)))  # (B,)
        w = w / np.where(norm > 0, norm, 1.0)[r]
        return (
            np.bincount(r, weights=w * self.coef[c], minlength=len(texts)) + self.intercept
        )  # (B,)

    def class_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """log P(positive) / P(negative), (B,) float64."""
        return torch.from_numpy(self.decision_function(texts))

    @staticmethod
    def _logit(logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    @staticmethod
    def _probability(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits).float()

    # -- files: JSON + safetensors only, so loading cannot run code --

    def save(self, path: str | os.PathLike) -> Path:
        """Write `config.json`, `vocabulary.json` and `weights.safetensors` into folder `path`."""
        from safetensors.numpy import save_file

        config = {
            "type": TFIDF_TYPE,
            "format": TFIDF_FORMAT,
            "kind": self.kind,
            "ngram_range": list(self.ngram_range),
            "sublinear_tf": self.sublinear_tf,
            "token_pattern": self.token_pattern,
            "lowercase": True,
            "norm": "l2",
            "preprocess": "minippo.app.data.clean_review",
            "num_features": len(self.vocabulary),
            "metrics": self.metrics,
        }
        weights = {"idf": self.idf, "coef": self.coef, "intercept": np.array([self.intercept])}
        with atomic_directory(path) as tmp:  # the folder appears complete or not at all
            write_json(Path(tmp) / "vocabulary.json", self.vocabulary, ensure_ascii=False)
            save_file(weights, str(Path(tmp) / "weights.safetensors"))
            write_json(Path(tmp) / "config.json", config)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None) -> TfidfSentiment:
        """Read a folder written by `save` (`kind` overrides the saved one)."""
        from safetensors.numpy import load_file

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("type") != TFIDF_TYPE:
            raise ValueError(
                f"{path} is not a minippo TF-IDF reward folder (config type {config.get('type')!r})"
            )
        if config.get("format") != TFIDF_FORMAT:
            raise ValueError(
                f"{path}: reward file format {config.get('format')} is not supported "
                f"(this minippo reads format {TFIDF_FORMAT}); retrain it with `minippo reward`"
            )
        weights = load_file(str(path / "weights.safetensors"))
        vocabulary = json.loads((path / "vocabulary.json").read_text())
        return cls(
            vocabulary,
            weights["idf"],
            weights["coef"],
            float(weights["intercept"][0]),
            ngram_range=tuple(config["ngram_range"]),
            sublinear_tf=config["sublinear_tf"],
            token_pattern=config["token_pattern"],
            kind=kind or config["kind"],
            metrics=config.get("metrics"),
        )


# -- Hugging Face classifiers --------------------------------------------------------------------

_POSITIVE_NAMES = ("positive", "pos", "label_1")


def find_positive_index(
    id2label: dict, num_labels: int, positive_label: str | int | None = None
) -> int:
    """The index of the positive class: `positive_label` (a label name or index) when given, else
    the label named POSITIVE / pos / LABEL_1 (any case), else index 1 of two, else 0 of one."""
    labels = {int(i): str(name) for i, name in (id2label or {}).items()}
    if positive_label is not None:
        if isinstance(positive_label, int) or str(positive_label).isdigit():
            index = int(positive_label)
            if not 0 <= index < num_labels:
                raise ValueError(
                    f"positive_label index {index} out of range for {num_labels} labels"
                )
            return index
        for i, name in labels.items():
            if name == positive_label:
                return i
        raise ValueError(
            f"positive_label {positive_label!r} is not one of the model's labels {labels}"
        )
    for wanted in _POSITIVE_NAMES:
        for i, name in labels.items():
            if name.lower() == wanted:
                return i
    if num_labels in (1, 2):
        return num_labels - 1
    raise ValueError(
        f"cannot tell which of the labels {labels} is positive: pass positive_label=..."
    )


class HFSentiment(_Scorer):
    """A Hugging Face sequence-classification model scoring the positive class: its raw logit
    (kind "logit", the blog's reward) or its softmax probability (kind "prob"; sigmoid for a
    single-logit model)."""

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        positive_label: str | int | None = None,
        kind: str = "logit",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .model_folders import ensure_pad_token, resolve_model

        self.kind = _check_kind(kind)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name_or_path = str(name_or_path)
        self.batch_size = batch_size
        self.device = torch.device(device)
        folder = resolve_model(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, output_loading_info=True
        )
        if fresh := sorted(info.get("missing_keys", [])) + sorted(info.get("mismatched_keys", [])):
            raise ValueError(
                f"reward {str(name_or_path)!r} is not a trained classifier: {len(fresh)} of its weights "
                f"are not in the checkpoint and would be initialised at random (e.g. {fresh[:3]}). "
                + REWARD_FOLDER_HELP
            )
        self.model = model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            ensure_pad_token(self.tokenizer)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        positions = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, self.tokenizer.model_max_length, positions)
        self.num_labels = self.model.config.num_labels
        self.positive_index = find_positive_index(
            self.model.config.id2label, self.num_labels, positive_label
        )
        self._inputs = set(inspect.signature(self.model.forward).parameters)

    @torch.no_grad()
    def class_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Classifier logits (B, num_labels) float32 on CPU, `batch_size` texts at a time."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in self._inputs}
            out.append(self.model(**enc).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_labels)

    def _logit(self, logits: torch.Tensor) -> torch.Tensor:
        """The positive class's raw logit, (B,) float32."""
        return logits[:, self.positive_index]

    def _probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(positive): the softmax over the classes (not the sigmoid of the positive logit)."""
        if self.num_labels == 1:
            return torch.sigmoid(logits[:, 0])
        return logits.softmax(-1)[:, self.positive_index]


# -- pairwise reward models ------------------------------------------------------------------------


class PairwiseSentiment(_Scorer):
    """A pairwise reward model's score s, calibrated into the log-odds of a positive review a * s + b
    (kind "logit") and P(positive) = sigmoid(a * s + b) (kind "prob"); (a, b) = (1, 0) for a model
    trained on other preferences than IMDB's."""

    def __init__(
        self,
        reward_model: RewardModel,
        calibration: Sequence[float] = (1.0, 0.0),
        kind: str = "logit",
        batch_size: int = 32,
        metrics: dict | None = None,
    ):
        self.reward_model = reward_model
        self.batch_size = batch_size
        self.scale, self.shift = (float(v) for v in calibration)
        self.kind = _check_kind(kind)
        self.metrics = dict(metrics or {})

    def class_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """a * score + b, (B,) float32 (the texts scored `batch_size` at a time)."""
        return self.reward_model.score(list(texts), self.batch_size) * self.scale + self.shift

    @staticmethod
    def _logit(logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    @staticmethod
    def _probability(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits).float()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        kind: str = "logit",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        model=None,
        model_dir: str | None = None,
    ) -> PairwiseSentiment:
        """The reward model in folder `path`, on `model` (a causal LM loaded from `model_dir`: PPO's
        policy) when it was trained on that model, as a second adapter on the same weights; else on a
        copy of its own base, loaded as it was trained (quantisation, dtype) on `device`."""
        from ..quant import load_model
        from .model_folders import load_tokenizer, quant_load_kwargs, resolve_model

        config = read_reward_config(path)
        base = resolve_model(config["base_model"])
        if model is None or not same_folder(base, model_dir):
            if model is not None:
                print(
                    f"reward: {path} was trained on {base}, not on {model_dir}: it runs on a copy of "
                    "its own base (train it on the PPO model to share one copy of the weights)"
                )
            quant = quant_load_kwargs(config.get("quant", "none"))
            model = load_model(base, **quant, dtype=config.get("dtype", "float32"), device=device)
        tokenizer = load_tokenizer(base, padding_side="right")
        reward_model = RewardModel.load(path, model, tokenizer, check_base=False)
        calibration = config.get("calibration", (1.0, 0.0))
        return cls(reward_model, calibration, kind, batch_size, config.get("metrics"))


def same_folder(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two paths name one folder."""
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def is_pairwise_reward(spec: str | os.PathLike) -> bool:
    """Whether `spec` is a pairwise reward model's folder (checked: `reward_model.json` and its files)."""
    path = Path(spec).expanduser()
    if not (path / REWARD_MODEL_FILE).is_file():
        return False
    check_reward_folder(path)
    return True


# -- what a reward folder must hold -----------------------------------------------------------------

REWARD_FOLDER_HELP = (
    "A reward must be a trained one: a TF-IDF reward folder from `minippo reward` (config.json of type "
    f"{TFIDF_TYPE!r}, vocabulary.json, weights.safetensors), a Hugging Face sequence classifier "
    "(config.json with a *ForSequenceClassification architecture, and the weights of its trained head), "
    "or a pairwise reward model from `minippo reward --model pairwise` (reward_model.json, "
    "score_head.safetensors and its adapter folder)."
)


def describe_folder(path: Path) -> str:
    """What a folder holds, in words (for the refusals)."""
    config = path / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return (
                f"a causal language model ({', '.join(architectures)}), with no trained score head"
            )
        return f"a model of architecture {architectures or 'unknown'}"
    if (path / "adapter_config.json").is_file():
        return "a LoRA adapter alone (adapter_config.json), with no score head"
    return f"the files {sorted(p.name for p in path.iterdir())[:8]}"


def check_reward_folder(path: str | os.PathLike) -> None:
    """ValueError, saying what the folder holds and what a reward folder must hold, unless folder `path`
    holds a trained reward: a TF-IDF one, a sequence classifier, or a complete pairwise reward model."""
    path = Path(path)
    if (path / REWARD_MODEL_FILE).is_file():  # a pairwise reward model: its head and adapter too
        config = read_reward_config(path)
        adapter = path / config.get("adapter_name", "reward") / "adapter_model.safetensors"
        if not adapter.is_file():
            raise ValueError(
                f"{path} has {REWARD_MODEL_FILE} but no adapter {adapter}. {REWARD_FOLDER_HELP}"
            )
        return
    config = path / "config.json"
    if config.is_file():
        saved = json.loads(config.read_text())
        architectures = saved.get("architectures") or []
        classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
        if saved.get("type") == TFIDF_TYPE or classifier:
            return
    raise ValueError(f"reward folder {path} holds {describe_folder(path)}. {REWARD_FOLDER_HELP}")


# -- by name --------------------------------------------------------------------------------------


def load_reward(
    spec: str | os.PathLike,
    kind: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    positive_label: str | int | None = None,
    model=None,
    model_dir: str | None = None,
) -> _Scorer:
    """A reward from `spec`: a folder saved by `TfidfSentiment.save` / `minippo reward`, a local HF
    classifier folder, or a hub name (downloaded, or from the HF cache offline). `kind` None keeps
    the TF-IDF file's kind and uses "logit" for the others. A folder that holds no trained reward is
    refused (`check_reward_folder`); `model` and `model_dir` go to `PairwiseSentiment.load`."""
    path = Path(spec).expanduser()
    config = path / "config.json"
    if path.is_dir() and any(path.iterdir()):
        check_reward_folder(path)
    if (path / REWARD_MODEL_FILE).is_file():
        return PairwiseSentiment.load(
            path, kind or "logit", device, batch_size, model=model, model_dir=model_dir
        )
    if config.is_file():
        if json.loads(config.read_text()).get("type") == TFIDF_TYPE:
            return TfidfSentiment.load(path, kind=kind)
        return HFSentiment(
            path,
            positive_label=positive_label,
            kind=kind or "logit",
            device=device,
            batch_size=batch_size,
        )
    if path.is_dir():
        raise FileNotFoundError(
            f"reward folder {path} has no config.json: expected a TF-IDF reward "
            f"saved by `minippo reward` or a Hugging Face classifier folder"
        )
    if str(spec).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"reward path {str(spec)!r} does not exist: train one with `minippo reward --output-dir {spec}`"
        )
    try:
        return HFSentiment(
            str(spec),
            positive_label=positive_label,
            kind=kind or "logit",
            device=device,
            batch_size=batch_size,
        )
    except OSError as e:
        raise OSError(
            f"{e}\nFor an offline reward, train the TF-IDF classifier with `minippo reward` "
            f"and pass its folder."
        ) from None


# -- the `minippo reward` step --------------------------------------------------------------------


@dataclass
class RewardConfig:
    model: str = "tfidf"
    """"tfidf" trains TF-IDF + logistic regression on IMDB; "pairwise" a pairwise reward model (a reward
    adapter and score head on --pairwise.base-model, the Bradley-Terry loss); else a HF classifier to
    evaluate."""
    data_dir: str | None = None
    """Folder with IMDB {train,validation}.parquet; None: $MINIPPO_IMDB_DIR, else the hub."""
    output_dir: str = "runs/reward"
    """Where the trained reward (and metrics.json) is written."""
    kind: str = "prob"
    """Score the reward returns: "prob" (P(positive)) or "logit" (log-odds / raw positive logit);
    "pairwise" is another spelling of --model pairwise (its score is a logit)."""
    num_train: int | None = None
    """Train on this many shuffled train reviews (None: all 20,000)."""
    num_eval: int | None = None
    """Evaluate on this many shuffled validation reviews (None: all 5,000)."""
    ngram_max: int = 2
    """TF-IDF: longest word n-gram (1 = single words only)."""
    min_df: int = 3
    """TF-IDF: drop n-grams found in fewer than this many reviews."""
    max_df: float = 0.9
    """TF-IDF: drop n-grams found in more than this fraction of reviews."""
    logreg_c: float = 4.0
    """Logistic regression: inverse L2 regularisation strength."""
    seed: int = 0
    """Seed for shuffling the reviews."""
    device: str = "cpu"
    """Device for a HF classifier's evaluation."""
    batch_size: int = 32
    """Texts per forward pass of a HF classifier or a pairwise reward model's evaluation."""
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)
    """The pairwise reward model's settings (--model pairwise; num_train and num_eval count pairs)."""

    def __post_init__(self):
        if self.kind == "pairwise":
            if self.model not in ("tfidf", "pairwise"):
                raise ValueError(
                    f"--kind pairwise trains a pairwise reward model, but --model is {self.model!r}: "
                    f"drop --model, or use --model pairwise"
                )
            self.model = "pairwise"
            self.kind = "logit"
        _check_kind(self.kind)
        check_fields(self, optional((lambda v: v >= 2, "at least 2")), "num_train", "num_eval")
        check_fields(self, POSITIVE_INT, "ngram_max", "min_df", "batch_size")
        check_fields(self, (lambda v: 0 < v <= 1, "a fraction in (0, 1]"), "max_df")
        check_fields(self, POSITIVE, "logreg_c")
        check_device(self)


def train_reward(config: RewardConfig) -> dict:
    """The `minippo reward` step: train the TF-IDF reward on IMDB train (or take a HF classifier),
    measure its validation accuracy, and write it (plus `metrics.json`) to `output_dir`.

    Returns {"metrics": {...}, "path": spec to pass to `load_reward`}.
    """
    out = Path(config.output_dir)
    if config.model == "pairwise":
        from .pairwise import train_pairwise_reward

        metrics = train_pairwise_reward(config, out)
        write_json(
            out / "metrics.json", {"config": asdict(config), "metrics": metrics, "path": str(out)}
        )
        return {"metrics": metrics, "path": str(out)}
    val = load_imdb("validation", config.data_dir, limit=config.num_eval, seed=config.seed)
    start = time.perf_counter()
    if config.model == "tfidf":
        train = load_imdb("train", config.data_dir, limit=config.num_train, seed=config.seed)
        reward = TfidfSentiment.fit(
            list(train["text"]),
            list(train["label"]),
            kind=config.kind,
            ngram_max=config.ngram_max,
            min_df=config.min_df,
            max_df=config.max_df,
            C=config.logreg_c,
        )
        metrics = {
            "num_train": len(train),
            "num_features": len(reward.vocabulary),
            "train_seconds": round(time.perf_counter() - start, 2),
        }
        path = str(out)
    else:
        reward = load_reward(
            config.model, kind=config.kind, device=config.device, batch_size=config.batch_size
        )
        metrics, path = {}, config.model
    metrics.update(
        num_validation=len(val),
        validation_accuracy=round(reward.accuracy(list(val["text"]), list(val["label"])), 4),
    )
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(reward, TfidfSentiment):
        reward.metrics = metrics
        reward.save(out)
    write_json(out / "metrics.json", {"config": asdict(config), "metrics": metrics, "path": path})
    return {"metrics": metrics, "path": path}


# -- reward functions: `--reward-fn path.py:name`, and the sentiment scorers as one ------------------


class SentimentReward:
    """A sentiment scorer (`TfidfSentiment`, `HFSentiment`, `load_reward`'s) as a reward function
    (`minippo.rewards`): it scores the whole review, prompt + completion, as `minippo ppo` does."""

    __name__ = "sentiment"

    def __init__(self, scorer: _Scorer):
        self.scorer = scorer

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.scorer([p + c for p, c in zip(prompts, completions)]).tolist()


def load_reward_fn(spec: str):
    """The reward function ``name`` defined in the Python file ``path.py``, from ``"path.py:name"``: any
    callable ``(prompts: list[str], completions: list[str]) -> list[float]``. The file runs as a module
    (it is code you chose to run). A bad spec, a missing file, a failing import, a missing or
    non-callable name each raise a ValueError (FileNotFoundError for the file) that says which."""
    import importlib.util

    path, sep, name = str(spec).rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(
            f"--reward-fn takes path.py:name (a Python file and the function's name in it), got {spec!r}"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"reward function file {str(file)!r} (from --reward-fn {spec}) does not exist"
        )
    module_spec = importlib.util.spec_from_file_location(f"reward_fn_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{file} is not a Python file that can be imported (--reward-fn {spec})")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(
            f"importing {file} for --reward-fn failed: {type(err).__name__}: {err}"
        ) from err
    if not hasattr(module, name):
        defined = sorted(
            k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
        )
        raise ValueError(
            f"{file} defines no {name!r} (--reward-fn {spec}); its callables: {defined}"
        )
    function = getattr(module, name)
    if not callable(function):
        raise ValueError(
            f"{file}:{name} is a {type(function).__name__}, not a function (prompts, completions) -> scores"
        )
    return function
