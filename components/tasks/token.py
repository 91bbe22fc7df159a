"""Token classification (NER): an IOB2 tag per word (PER, ORG, LOC, MISC, ...).

    kubetune run --task token-classification                         # CoNLL-2003 English, official splits
    python -m kubetune.steps.validate --task token-classification --train builtin:conll2003 --out /tmp/kt/dataset \
        --report /tmp/kt/report.md --expectations /tmp/kt/expectations.json --store ./kubetune-store --run-id dev

Everything that is particular to the task lives here; the steps call it through the Task interface
(kubetune.tasks.base). Data: CoNLL-style column files or JSONL {"tokens", "tags"} sentences,
checked by kubetune.validation.tagging. Tokenization aligns word pieces with `word_ids()`: each
word's tag goes on its first sub-token, the other sub-tokens and the special tokens get IGNORE
(-100). Model: AutoModelForTokenClassification, cross-entropy per labelled token. Metrics:
entity-level precision/recall/F1 per type, micro and macro (seqeval's default semantics), and word
accuracy; the gate defaults to entity micro-F1. Predictions: {"entities": [{"text", "type",
"start", "end", "score"}, ...]} with character offsets into the raw text.

Raw texts are split into words the way CoNLL data is (runs of letters/digits, possibly joined by
. & - or an apostrophe; a possessive 's alone; each other non-space character alone); each word is
tagged by its first sub-token, as in training; B-/I- runs of one type make an entity whose score is
the mean of its words' tag probabilities. Words past max_length tokens are not tagged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from kubetune.monitoring.profile import CONFIDENCE_EDGES
from kubetune.storage.contracts import ModelInputs
from kubetune.storage.shards import IGNORE, TokenizedSplit
from kubetune.tasks import base, encoding
from kubetune.tasks.metrics import NER_METRICS, confusion, entity_metrics, entity_spans, per_type_table
from kubetune.tasks.predictor import softmax
from kubetune.validation import tagging
from kubetune.validation.report import SPLITS, Report

ENTITY_COUNT_EDGES = [0, 1, 2, 3, 4, 6, 8, 12, 13]  # entities per sentence; the last bin: 12 or more
WORD = re.compile(r"\w+(?:[.&-]\w+|['’](?!s\b)\w+)*|['’]s\b|[^\w\s]")


class TokenClassification:
    name = "token-classification"
    summary = "an IOB2 tag per word (NER)"
    formats = tagging.FORMATS
    default_data = "builtin:conll2003"
    row_unit = "sentences"
    metrics = NER_METRICS
    gate_only_metrics = ()
    default_metric = "entity_micro_f1"
    headline = ("entity_micro_f1", "entity_macro_f1", "token_accuracy")  # logs, epoch history, step outputs, commits
    summary_metrics = ("entity_micro_f1", "entity_macro_f1", "entity_micro_precision", "entity_micro_recall",
                       "token_accuracy", "per_type", "confusion_matrix")
    peft_task_type = "TOKEN_CLS"
    head_modules = ()
    input_axes = ("batch", "sequence")
    per_token = True  # logits [batch, sequence, labels]
    segments = 1  # one text per row
    input_fields = ("text",)
    list_fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
    model_purpose = "tag tokens"
    truncations = ("head",)  # words past max_length are dropped; their entities count as missed
    # --epochs 0: at least 400 optimizer steps (fewer than one epoch of the full CoNLL-2003, 439 steps, which
    # keeps 1 epoch), at most 30 epochs. Nine tags per word learn slower than a label
    # per text: 300 CoNLL sentences (10 steps per epoch) trained 100 steps to eval entity micro-F1 0.59, still
    # rising; over 400 steps: entity F1 0 until step 30, 0.71 at step 100, 0.73-0.78 from step 120 on
    auto_min_steps = 400
    auto_max_epochs = 30

    fans_out = False  # sentences are read and checked in memory (kubetune.validation.tagging)

    # ---- validate ------------------------------------------------------------------------------
    def sources(self, train: str, eval_: str, test: str) -> dict[str, str]:
        """Given files, else a builtin's official eval/test splits, else split off train."""
        return tagging.sources_for(train, eval_, test)

    def load(self, split: str, uri: str, cfg, settings, workdir: Path):
        return tagging.read_sentences(uri, split=split, token_column=cfg.token_column, tag_column=cfg.tag_column,
                                      tokens_field=cfg.tokens_field, tags_field=cfg.tags_field, settings=settings, workdir=workdir)

    def check(self, data: dict, sources: dict, formats_: dict, files: dict, cfg) -> tuple[Report, dict]:
        return tagging.check_sentences(data, sources, cfg, formats_, files)

    def prepare(self, usable: dict, sources: dict, cfg, out_dir: Path) -> dict:
        return tagging.prepare_sentences(usable, sources, cfg, out_dir, self.name)

    def describe_splits(self, meta: dict) -> str:
        return (", ".join(f"{s} {meta['splits'][s]['rows']} sentences" for s in SPLITS)
                + f"; entities in train {meta['splits']['train']['entities']}")

    # ---- tokenize ------------------------------------------------------------------------------
    def tokenize(self, tokenizer, frame, label_ids: dict, cfg, progress) -> base.Tokenized:
        """Token ids and aligned token labels per pre-split sentence, truncated to max_length; also the
        counts of what truncation cost (sentences, sub-tokens, words) and of words the tokenizer turned
        into nothing (replaced by its unknown token, so every word keeps a position and a label)."""
        sentences = frame["tokens"].tolist()
        tags = [[label_ids[t] for t in row] for row in frame["tags"]]
        rows, labels = [], []
        stats = {"truncated_rows": 0, "truncated_tokens": 0, "truncated_words": 0, "empty_words": 0}
        for start in range(0, len(sentences), cfg.batch_size):
            words = [list(s) for s in sentences[start:start + cfg.batch_size]]
            full = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=False, verbose=False)
            for j in range(len(words)):
                seen = {w for w in full.word_ids(j) if w is not None}
                if len(seen) < len(words[j]):  # e.g. a lone control or zero-width character
                    stats["empty_words"] += len(words[j]) - len(seen)
                    words[j] = [w if i in seen else tokenizer.unk_token for i, w in enumerate(words[j])]
                    full["input_ids"][j] = tokenizer(words[j], is_split_into_words=True, add_special_tokens=True)["input_ids"]
            # the untruncated pass counts what truncation drops; the truncated one is what is kept
            cut = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=True, max_length=cfg.max_length)
            for j in range(len(words)):
                ids, word_ids = cut["input_ids"][j], cut.word_ids(j)
                if len(full["input_ids"][j]) > len(ids):
                    stats["truncated_rows"] += 1
                    stats["truncated_tokens"] += len(full["input_ids"][j]) - len(ids)
                    stats["truncated_words"] += len(words[j]) - len({w for w in word_ids if w is not None})
                rows.append(ids)
                labels.append(align_labels(word_ids, tags[start + j]))
            progress.update(len(words))
        return base.Tokenized(rows, np.full(len(rows), IGNORE, dtype=np.int64), labels, stats)

    def tokenize_notes(self, split: str, stats: dict, rows: int, max_length: int) -> list[str]:
        notes = []
        if stats["truncated_rows"]:
            notes.append(f"{split}: {stats['truncated_rows']} of {rows} sentences truncated to {max_length} tokens "
                         f"({stats['truncated_tokens']} tokens dropped, {stats['truncated_words']} words lost)")
        if stats.get("empty_words"):
            notes.append(f"{split}: {stats['empty_words']} words have no sub-token in this tokenizer; they were given its unknown token")
        return notes

    # ---- monitor (kubetune.monitoring) ---------------------------------------------------------
    def profile_texts(self, frame) -> list[str]:
        """A sentence's words joined by spaces: the raw text that batch inference and serving see."""
        return [" ".join(t) for t in frame["tokens"]]

    def profile_outputs(self, predictions: list[dict], labels: list[str]) -> dict:
        """The profile's prediction signals: predicted entity-type counts, entities per sentence and
        the entities' confidence."""
        counts = dict.fromkeys(entity_types(labels), 0)
        for p in predictions:
            for e in p["entities"]:
                counts[e["type"]] = counts.get(e["type"], 0) + 1
        return {"distributions": {"predicted_entity_type": counts},
                "histograms": {"entities_per_sentence": ([len(p["entities"]) for p in predictions], ENTITY_COUNT_EDGES),
                               "confidence": ([e["score"] for p in predictions for e in p["entities"]], CONFIDENCE_EDGES)}}

    def profile_gold(self, frame, labels: list[str]) -> dict:
        counts = dict.fromkeys(entity_types(labels), 0)
        for tags in frame["tags"]:
            for kind, _, _ in entity_spans(list(tags)):
                counts[kind] = counts.get(kind, 0) + 1
        return {"entity_type": counts}

    # ---- model ---------------------------------------------------------------------------------
    def model_class(self):
        import transformers

        return transformers.AutoModelForTokenClassification

    def loss(self, logits, target, inputs=None):
        """Cross-entropy per labelled token: IGNORE on padding, continuation sub-tokens and special tokens."""
        import torch.nn.functional as F

        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)

    def targets(self, split) -> np.ndarray:
        """The gold tag id of each logit row (every real token; IGNORE where a token carries no tag)."""
        return np.asarray(split.token_labels)  # a big split's are on disk (kubetune.storage.shards.DiskArray)

    def scores(self, logits: np.ndarray, split, labels: list[str]) -> dict:
        """Entity-level scores of token logits against the split's own (truncated) word labels."""
        return entity_metrics(*word_level_tags(split, logits.argmax(-1), labels))

    # ---- evaluate ------------------------------------------------------------------------------
    def test_metrics(self, logits: np.ndarray, split, frame, labels: list[str], settings: dict) -> tuple[dict, list, object]:
        """Entity metrics against the full gold sentences (words lost to truncation count as
        predicted O); the rows a champion is re-scored on are the word lists."""
        gold = [list(t) for t in frame["tags"]]
        kept = word_level_tags(split, logits.argmax(-1), labels)[1]
        return test_metrics(gold, kept, labels), [list(t) for t in frame["tokens"]], gold

    def champion_metrics(self, predictor, rows: list, gold, labels: list[str]) -> dict:
        return entity_metrics(gold, tags_for_words(predictor, rows))

    def describe_test(self, m: dict) -> str:
        """One line of test figures, from the run summary's metrics (summary_metrics)."""
        per = ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in m["per_type"].items())
        return (f"entity micro-F1 {m['entity_micro_f1']:.4f}, macro-F1 {m['entity_macro_f1']:.4f}, token accuracy "
                f"{m['token_accuracy']:.4f} ({per})")

    def kfp_metrics(self, m: dict) -> dict[str, float]:
        return {**{k: m[k] for k in self.metrics}, **{f"f1_{kind}": s["f1"] for kind, s in m["per_type"].items()}}

    def card(self, evaluation: dict) -> tuple[str, str, str]:
        m = evaluation["metrics"]
        return (f"Token classifier (NER; entity types {', '.join(m['per_type'])}, IOB2 tags)",
                f"entity micro-F1 {m['entity_micro_f1']:.4f}, entity macro-F1 {m['entity_macro_f1']:.4f}, "
                f"token accuracy {m['token_accuracy']:.4f} ({m['entities']} entities)", per_type_table(m))

    # ---- predict -------------------------------------------------------------------------------
    def input_problem(self, item) -> str:
        return ""

    def encode(self, tokenizer, inputs: ModelInputs, texts: list[str]) -> encoding.Encoded:
        """Raw texts split into words (see the module docstring), tokenized as words with offsets; a
        text without words is its special tokens alone. `extra`: per text (text, (word spans, word ids, offsets) or None)."""
        spans = [word_spans(t) for t in texts]
        enc = tokenizer([[t[a:b] for a, b in sp] for t, sp in zip(texts, spans)], is_split_into_words=True, truncation=True,
                        max_length=inputs.max_length, return_offsets_mapping=True)
        rows = enc["input_ids"]
        truncated = np.array([bool(e.overflowing) for e in enc.encodings], dtype=bool)
        extra = [(spans[i], enc.word_ids(i), enc["offset_mapping"][i]) if spans[i] else None for i in range(len(texts))]
        return encoding.Encoded(rows, truncated, [(t, e) for t, e in zip(texts, extra)])

    def decode(self, encoded: encoding.Encoded, logits: list[np.ndarray], labels: list[str]) -> list[dict]:
        """Per text {"entities": [...]}: word tags from each word's first sub-token, grouped into entities."""
        out = []
        for (text, extra), row in zip(encoded.extra, logits):
            if extra is None:  # a text without words has no entities
                out.append({"entities": []})
                continue
            spans, word_ids, offsets = extra
            probs = softmax(row.astype(np.float64))
            first = [pos for pos, _ in first_subtokens(word_ids)]
            tags = [labels[int(probs[pos].argmax())] for pos in first]
            scores = [float(probs[pos].max()) for pos in first]
            out.append({"entities": group_entities(text, spans, word_ids, offsets, tags, scores)})
        return out

    def output_columns(self, predictions: list[dict], labels: list[str]) -> dict:
        """Batch inference columns: the entities of each text as JSON (what serving returns) and their count."""
        return {"entities": [json.dumps(p["entities"], ensure_ascii=False) for p in predictions],
                "entity_count": np.array([len(p["entities"]) for p in predictions], dtype=np.int64)}

    def output_types(self, labels: list[str]) -> list[dict]:
        return []  # the outputs follow predict's keys (kubetune.serving.protocol)


TASK = TokenClassification()


# ---- helpers -------------------------------------------------------------------------------------


def entity_types(labels: list[str]) -> list[str]:
    """The entity types of an IOB2 tag set (B-PER, I-PER, ... -> PER), sorted."""
    return sorted({t[2:] for t in labels if t[:2] in ("B-", "I-")})


def align_labels(word_ids: list[int | None], tag_ids: list[int]) -> list[int]:
    """Per sub-token label: the word's tag on its first sub-token, IGNORE on the word's other
    sub-tokens and on special tokens (they are neither trained on nor scored)."""
    out, prev = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == prev else tag_ids[w])
        prev = w
    return out


def word_level_tags(split: TokenizedSplit, pred_ids: np.ndarray, labels: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag sequences per sentence, one tag per word kept after truncation: the
    labelled positions are each word's first sub-token. `pred_ids`: a tag id per token, end to end."""
    gold, pred = [], []
    for i in range(len(split)):
        y = split.row_labels(i)
        keep = y != IGNORE
        gold.append([labels[k] for k in y[keep]])
        pred.append([labels[k] for k in pred_ids[split.offsets[i]:split.offsets[i + 1]][keep]])
    return gold, pred


def test_metrics(gold: list[list[str]], kept: list[list[str]], labels: list[str] | None = None) -> dict:
    """Entity metrics against the full gold sentences: words cut off by truncation count as
    predicted O (the model never saw them), so truncation costs recall instead of vanishing. With
    `labels`, also the word-level tag confusion matrix (the Kubeflow UI draws it)."""
    pred = [p + ["O"] * (len(g) - len(p)) for g, p in zip(gold, kept)]
    metrics = entity_metrics(gold, pred)
    metrics["truncated_words"] = sum(len(g) - len(p) for g, p in zip(gold, kept))
    if labels:
        index = {t: i for i, t in enumerate(labels)}
        flat = [(index[a], index[b]) for g, p in zip(gold, pred) for a, b in zip(g, p)]
        cm = confusion(np.array([a for a, _ in flat], dtype=np.int64), np.array([b for _, b in flat], dtype=np.int64), len(labels))
        metrics["confusion_matrix"] = {"labels": list(labels), "matrix": cm.tolist()}
    return metrics


def first_subtokens(word_ids: list[int | None]) -> list[tuple[int, int]]:
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
    first = first_subtokens(word_ids)
    last = {w: pos for pos, w in enumerate(word_ids) if w is not None}
    found = []
    for kind, k0, k1 in entity_spans(tags):
        (pos0, w0), w1 = first[k0], first[k1][1]
        start = spans[w0][0] + offsets[pos0][0]
        end = spans[w1][0] + offsets[last[w1]][1]
        found.append({"text": text[start:end], "type": kind, "start": int(start), "end": int(end),
                      "score": float(np.mean(scores[k0:k1 + 1]))})
    return found


def tags_for_words(predictor, sentences: list[list[str]], batch_size: int = 64) -> list[list[str]]:
    """Tags of pre-split words (e.g. a CoNLL test file, the gate's champion scoring): a tag per word,
    from its first sub-token as in training; words past max_length get O."""
    if not sentences:
        return []
    enc = predictor.tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True, max_length=predictor.max_length)
    split = TokenizedSplit.from_rows(enc["input_ids"])
    flat = predictor.logits(split, batch_size)
    out = []
    for i in range(len(split)):
        logits, tags = flat[split.offsets[i]:split.offsets[i + 1]], ["O"] * len(sentences[i])
        for pos, w in first_subtokens(enc.word_ids(i)):
            tags[w] = predictor.labels[int(logits[pos].argmax())]
        out.append(tags)
    return out
