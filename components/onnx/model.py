"""An exported model folder, loaded for inference with ONNX Runtime.

Folder layout (written by kubetune.steps.export, published by kubetune.steps.deploy):
  model.onnx        inputs input_ids / attention_mask [/ token_type_ids], int64 [batch, sequence];
                    output logits float32 [batch, num_labels] (token classification:
                    [batch, sequence, num_labels])
  tokenizer.json, tokenizer_config.json, ...   the fast tokenizer
  labels.json       {"labels": [...]} in logit order
  kubetune.json     task, max_length, input names, base model, opset, and `variants`

Variants: one folder can hold several graphs of the same model, each accepted by export only after
a check on held-out rows (argmax agreement with torch, accuracy drop; see kubetune.steps.export):
  model.onnx            fp32        the reference graph, always present
  model.optimized.onnx  optimized   fp32 with ONNX Runtime's transformer fusions (attention, LayerNorm, GELU)
  model.fp16.onnx       fp16        the optimized graph in float16 (inputs/outputs stay int64/float32), for CUDA
  model.int8.onnx       int8        the optimized graph with int8 dynamic quantization of its weights, for CPU
`kubetune.json` lists the accepted ones: {"variants": {"<name>": {"file", "agreement", "accuracy",
"accuracy_drop", ...}}}; a folder written before variants existed has fp32 only.
`OnnxClassifier(dir, variant="auto")` loads the best accepted variant for the device (CPU: optimized,
fp32; CUDA: fp16, optimized, fp32); name one to pin it. int8 is opt-in (`variant="int8"`): fastest on
CPU, but its scores vary slightly with the batch a text is scored in.

Execution providers are explicit: asking for CUDA on a machine where ONNX Runtime cannot load it
(no GPU, missing CUDA/cuDNN libraries) is an error naming the providers it has, never a silent
fallback to the CPU.

`predict(texts)` is the one prediction path of batch inference and serving. Its answer depends on
`kubetune.json`'s task:
  sequence-classification  {"label", "score", "probabilities": {label: p}}
  token-classification     {"entities": [{"text", "type", "start", "end", "score"}, ...]}: character
                           offsets into the raw text (text[start:end] == entity text), found from the
                           tokenizer's offset mapping. The text is split into words the way CoNLL data
                           is (letters/digits runs, each punctuation mark alone); each word is tagged
                           by its first sub-token, as in training; B-/I- runs of one type make an
                           entity whose score is the mean of its words' tag probabilities. Words past
                           max_length tokens are not tagged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from kubetune.errors import ConfigError, InputError
from kubetune.tasks.metrics import SEQUENCE, TOKEN, entity_spans
from kubetune.storage.shards import TokenizedSplit, pad_batch, sorted_batches

# a word, as CoNLL-style data splits text: a run of letters/digits, possibly joined by . & - or an
# apostrophe (U.S, AT&T, 1996-08-22, O'Neill); a possessive 's on its own; any other non-space
# character alone (punctuation)
WORD = re.compile(r"\w+(?:[.&-]\w+|['’](?!s\b)\w+)*|['’]s\b|[^\w\s]")
VARIANTS = ("fp32", "optimized", "fp16", "int8")
# int8 is never picked automatically: dynamic quantization scales activations per batch, so its
# scores depend on which texts share a batch (batch inference vs a server's micro-batches)
PREFERENCE = {"cpu": ("optimized", "fp32"), "cuda": ("fp16", "optimized", "fp32")}
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def create_session(model_path: Path, device: str = "cpu", threads: int = 0):
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise ConfigError(f"ONNX Runtime device {device!r}: use cpu or cuda")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=PROVIDERS[device])
    active = session.get_providers()
    if device == "cuda" and active[0] != "CUDAExecutionProvider":
        raise ConfigError(
            f"CUDA was requested but ONNX Runtime runs {active} (available: {ort.get_available_providers()}); "
            "check the GPU, the CUDA/cuDNN libraries and that onnxruntime-gpu (not onnxruntime) is installed"
        )
    return session


def variant_file(variant: str) -> str:
    if variant not in VARIANTS:
        raise ConfigError(f"ONNX variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"


def accepted_variants(model_dir: Path) -> dict[str, dict]:
    """The variants export accepted for this folder, by name (fp32 alone for older folders)."""
    info = json.loads((model_dir / "kubetune.json").read_text())
    return info.get("variants") or {"fp32": {"file": "model.onnx"}}


def pick_variant(model_dir: Path, variant: str, device: str, unchecked: bool = False) -> str:
    """`auto`: the best accepted variant for `device`; a name: that one, or an error listing what
    exists. `unchecked`: any variant whose file exists (only export uses it, to check candidates)."""
    accepted = accepted_variants(model_dir)
    if variant == "auto":
        return next(v for v in PREFERENCE.get(device, ("fp32",)) + ("fp32",) if v in accepted)
    if unchecked and (model_dir / variant_file(variant)).is_file():  # variant_file also rejects unknown names
        return variant
    if variant not in accepted:
        variant_file(variant)
        raise InputError(f"{model_dir}: has no accepted {variant} variant; it has {', '.join(accepted)}")
    return variant


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _as_split(rows: list[list[int]]) -> TokenizedSplit:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    ids = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, dtype=np.int32)
    return TokenizedSplit(ids, offsets, np.zeros(len(rows), dtype=np.int64))


def _first_subtokens(word_ids: list[int | None]) -> list[tuple[int, int]]:
    """(position, word) of each word's first sub-token: the position that carries its tag."""
    out, prev = [], None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev:
            out.append((pos, w))
        prev = w
    return out


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the words of a raw text (see WORD)."""
    return [(m.start(), m.end()) for m in WORD.finditer(text)]


def group_entities(text: str, spans: list[tuple[int, int]], word_ids: list[int | None], offsets: list[tuple[int, int]],
                   tags: list[str], scores: list[float]) -> list[dict]:
    """Entities from word tags. `spans`: the words' character spans in `text`; `word_ids`/`offsets`:
    the tokenizer's per-sub-token word index and offset mapping (relative to the word, as for
    is_split_into_words input); `tags`/`scores`: one per word that has a sub-token, in order."""
    first = _first_subtokens(word_ids)
    last = {w: pos for pos, w in enumerate(word_ids) if w is not None}
    found = []
    for kind, k0, k1 in entity_spans(tags):
        (pos0, w0), w1 = first[k0], first[k1][1]
        start = spans[w0][0] + offsets[pos0][0]
        end = spans[w1][0] + offsets[last[w1]][1]
        found.append({"text": text[start:end], "type": kind, "start": int(start), "end": int(end),
                      "score": float(np.mean(scores[k0:k1 + 1]))})
    return found


class OnnxClassifier:
    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0, variant: str = "auto", unchecked: bool = False):
        from transformers import AutoTokenizer

        if not (model_dir / "model.onnx").is_file():
            raise InputError(f"{model_dir}: no model.onnx; expected a folder written by kubetune export")
        self.dir = model_dir
        self.info = json.loads((model_dir / "kubetune.json").read_text())
        self.labels = json.loads((model_dir / "labels.json").read_text())["labels"]
        self.variant = pick_variant(model_dir, variant, device, unchecked)
        self.session = create_session(model_dir / variant_file(self.variant), device, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = int(self.info["max_length"])
        self.task = self.info.get("task", SEQUENCE)

    def _run(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(["logits"], feed)[0]

    def logits_for_tokens(self, split: TokenizedSplit, batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(split), len(self.labels)), dtype=np.float32)
        for index in sorted_batches(split.lengths, batch_size):
            out[index] = self._run(*pad_batch(split, index, self.tokenizer.pad_token_id))
        return out

    def token_logits_for_tokens(self, split: TokenizedSplit, batch_size: int = 64) -> list[np.ndarray]:
        """Token classification: per row, its [row length, num_labels] logits."""
        out: list[np.ndarray] = [np.zeros(0)] * len(split)
        for index in sorted_batches(split.lengths, batch_size):
            logits = self._run(*pad_batch(split, index, self.tokenizer.pad_token_id))
            for j, i in enumerate(index):
                out[i] = logits[j, : split.lengths[i]]
        return out

    def _encode_words(self, words: list[list[str]], **kwargs):
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length, **kwargs)
        return enc, _as_split(enc["input_ids"])

    def tags_for_words(self, sentences: list[list[str]], batch_size: int = 64) -> list[list[str]]:
        """Token classification on pre-split words (e.g. a CoNLL test file): a tag per word, from its
        first sub-token; words past max_length get O."""
        if not sentences:
            return []
        enc, split = self._encode_words([list(s) for s in sentences])
        out = []
        for i, logits in enumerate(self.token_logits_for_tokens(split, batch_size)):
            tags = ["O"] * len(sentences[i])
            for pos, w in _first_subtokens(enc.word_ids(i)):
                tags[w] = self.labels[int(logits[pos].argmax())]
            out.append(tags)
        return out

    def entities(self, texts: list[str], batch_size: int = 64) -> list[list[dict]]:
        """Entities of raw texts, with character offsets (see the module docstring)."""
        spans = [word_spans(t) for t in texts]
        todo = [i for i, sp in enumerate(spans) if sp]  # a text without words has no entities
        out: list[list[dict]] = [[] for _ in texts]
        if not todo:
            return out
        enc, split = self._encode_words([[texts[i][a:b] for a, b in spans[i]] for i in todo], return_offsets_mapping=True)
        for j, logits in enumerate(self.token_logits_for_tokens(split, batch_size)):
            probs = softmax(logits.astype(np.float64))
            first = [pos for pos, _ in _first_subtokens(enc.word_ids(j))]
            tags = [self.labels[int(probs[pos].argmax())] for pos in first]
            scores = [float(probs[pos].max()) for pos in first]
            out[todo[j]] = group_entities(texts[todo[j]], spans[todo[j]], enc.word_ids(j), enc["offset_mapping"][j], tags, scores)
        return out

    def encode(self, texts: list[str]) -> tuple[TokenizedSplit, np.ndarray]:
        """Token ids with the model's own tokenizer and max_length, and which texts were truncated."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        # a fast tokenizer keeps what truncation cut off in `overflowing`
        truncated = np.array([bool(e.overflowing) for e in enc.encodings], dtype=bool) if enc.encodings else np.zeros(len(texts), bool)
        return _as_split(enc["input_ids"]), truncated

    def logits_for_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Tokenize with the model's own tokenizer and max_length, batch similar lengths."""
        return self.logits_for_tokens(self.encode(texts)[0], batch_size)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities (float64, the model's label order) from logits of any variant."""
        return softmax(logits.astype(np.float64))

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """The prediction contract shared by batch inference and serving: per text, the top label,
        its probability and every class probability ({label: p}, in the model's label order)."""
        if not texts:
            return []
        if self.task == TOKEN:
            return [{"entities": e} for e in self.entities(texts, batch_size)]
        probs = self.probabilities(self.logits_for_texts(texts, batch_size))
        top = probs.argmax(-1)
        return [{"label": self.labels[k], "score": float(p[k]), "probabilities": dict(zip(self.labels, map(float, p)))}
                for k, p in zip(top, probs)]
