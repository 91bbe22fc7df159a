"""The JSON files that pass between steps and travel with a model, as typed data. Each is read and
written here only, carries a "format" number, and a missing file, unreadable JSON, a missing field or
another format is one InputError naming the file and what to do about it.

    file                          class           written by   read by
    <dataset folder>/meta.json    DatasetMeta     validate     tokenize, freshness, load_dataset
    <tokens folder>/meta.json     TokensMeta      tokenize     finetune, evaluate, export, tokenize's cache
    <model folder>/kubetune.json  ModelSettings   export       OnnxClassifier (serving, batch inference, the gate), deploy

`ModelInputs` (how inputs become model inputs: max_length, truncation, input names, pad and [SEP] ids)
is part of the tokens meta and of the model settings: the encoder (kubetune.tasks.encoding) and the
backends read it, never the raw keys. Files written before "format" existed are read as format 1.

    python -c "from kubetune.storage.contracts import ModelSettings; print(ModelSettings.read(Path('model')))"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from kubetune.errors import InputError

META = "meta.json"
MODEL_SETTINGS = "kubetune.json"
TOKENS_FORMAT = 2  # the shard layout (kubetune.storage.shards); part of the tokenize cache key: old entries stop matching


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or one InputError naming the file and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path.parent}: no {path.name}; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; {fix}")
    return data


def read_labels(folder: Path, fix: str = "export or download the model again") -> list[str]:
    """labels.json's label list (logit order), written beside a dataset's meta.json and in a model folder."""
    labels = read_json(folder / "labels.json", fix).get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise InputError(f"{folder / 'labels.json'}: no \"labels\" list of strings; {fix}")
    return labels


def write_labels(folder: Path, labels: list[str]) -> None:
    _write(folder / "labels.json", {"labels": list(labels)})


def data_fingerprint(fingerprints: dict[str, str]) -> str:
    """One fingerprint for the train/eval/test splits (each a sha256 of its rows, from validate):
    equal iff every split has the same rows in the same order. Recorded with each registry version."""
    return hashlib.sha256(json.dumps(dict(sorted(fingerprints.items()))).encode()).hexdigest()


def _checked(path: Path, fix: str, fmt: int, required: tuple[str, ...]) -> dict:
    data = read_json(path, fix)
    found = data.get("format", 1)
    if found != fmt:
        raise InputError(f"{path}: format {found}, but this kubetune reads format {fmt}; {fix}")
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)}; {fix}")
    return data


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


@dataclass(frozen=True)
class ModelInputs:
    """How inputs become model inputs (kubetune.tasks.encoding): the length they are cut to, which
    part of a long text is kept, the model's input names, and the pad and [SEP] ids (text pairs'
    segment ids start after the first [SEP]; None for single texts)."""

    max_length: int
    truncation: str = "head"
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    pad_token_id: int = 0
    sep_token_id: int | None = None


@dataclass(frozen=True)
class DatasetMeta:
    """A validated dataset folder's meta.json: the task, the label set, where each split came from,
    and per split its rows, counts and content fingerprint."""

    FORMAT = 1
    FIX = "run kubetune.steps.validate again to write the dataset folder"

    task: str
    labels: list[str]
    splits: dict
    sources: dict = field(default_factory=dict)
    split_made_here: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def fingerprints(self) -> dict[str, str]:
        return {s: v["fingerprint"] for s, v in self.splits.items()}

    def write(self, folder: Path) -> None:
        """meta.json, and labels.json beside it (the label set alone, for tools that want only that)."""
        write_labels(folder, self.labels)
        _write(folder / META, {"format": self.FORMAT, **asdict(self)})

    @classmethod
    def read(cls, folder: Path) -> "DatasetMeta":
        data = _checked(folder / META, cls.FIX, cls.FORMAT, ("task", "labels", "splits"))
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class TokensMeta:
    """A tokens folder's meta.json: what was tokenized (task, labels, data fingerprints), how
    (`inputs`), and per split its shards and length/truncation/coverage statistics."""

    FIX = "run kubetune.steps.tokenize again to write the tokens folder"

    cache_key: str
    task: str
    labels: list[str]
    inputs: ModelInputs
    data_fingerprints: dict
    splits: dict

    def to_json(self) -> dict:
        i = self.inputs
        return {"format": TOKENS_FORMAT, "cache_key": self.cache_key, "task": self.task, "labels": self.labels,
                "max_length": i.max_length, "truncation": i.truncation, "pad_token_id": i.pad_token_id,
                "model_input_names": list(i.input_names), "sep_token_id": i.sep_token_id,
                "data_fingerprints": self.data_fingerprints, "splits": self.splits}

    def write(self, folder: Path) -> None:
        _write(folder / META, self.to_json())

    @classmethod
    def read(cls, folder: Path) -> "TokensMeta":
        return cls.from_json(_checked(folder / META, cls.FIX, TOKENS_FORMAT, ("task", "labels", "max_length", "pad_token_id",
                                                                            "model_input_names", "splits")))

    @classmethod
    def from_json(cls, data: dict) -> "TokensMeta":
        inputs = _inputs(data, "model_input_names", pad_token_id=int(data["pad_token_id"]))
        return cls(data.get("cache_key", ""), data["task"], list(data["labels"]), inputs, data.get("data_fingerprints", {}),
                   data["splits"])


@dataclass(frozen=True)
class ModelSettings:
    """An exported model folder's kubetune.json: the task, how inputs become model inputs (the pad
    id is the tokenizer's), the graph's output and opset, and the variants export accepted (a folder
    from before variants has fp32 only)."""

    FIX = "export or download the model again"

    task: str
    inputs: ModelInputs
    output: str = "logits"
    opset: int | None = None
    torch: str = ""
    variants: dict = field(default_factory=dict)
    rejected_variants: dict = field(default_factory=dict)

    def accepted(self) -> dict[str, dict]:
        return self.variants or {"fp32": {"file": "model.onnx"}}

    def with_variants(self, variants: dict, rejected: dict) -> "ModelSettings":
        return replace(self, variants=variants, rejected_variants=rejected)

    def write(self, folder: Path) -> None:
        i = self.inputs
        data = {"format": 1, "task": self.task, "max_length": i.max_length, "truncation": i.truncation,
                "input_names": list(i.input_names), "sep_token_id": i.sep_token_id, "output": self.output, "opset": self.opset,
                "torch": self.torch}
        if self.variants:
            data["variants"] = self.variants
        if self.rejected_variants:
            data["rejected_variants"] = self.rejected_variants
        _write(folder / MODEL_SETTINGS, data)

    @classmethod
    def read(cls, folder: Path, default_task: str = "") -> "ModelSettings":
        """`default_task`: the task of a folder exported before task families (kubetune.tasks.DEFAULT)."""
        data = _checked(folder / MODEL_SETTINGS, cls.FIX, 1, ("max_length",))
        return cls(data.get("task", default_task), _inputs(data, "input_names"), data.get("output", "logits"), data.get("opset"),
                   data.get("torch", ""), data.get("variants") or {}, data.get("rejected_variants") or {})


def _inputs(data: dict, names_key: str, **given) -> ModelInputs:
    """ModelInputs from a meta.json or kubetune.json (which name the input names differently)."""
    names = data.get(names_key)
    return ModelInputs(max_length=int(data["max_length"]), truncation=data.get("truncation", ModelInputs.truncation),
                       input_names=tuple(names) if names else ModelInputs.input_names, sep_token_id=data.get("sep_token_id"), **given)
