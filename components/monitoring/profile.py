"""A profile of texts and of a model's predictions on them: the reference profile frozen with
each registry version (profile.json, computed by evaluate on the test split) and the profile of
new data that a drift report compares with it.

    {"format": 1, "task", "labels", "max_length", "rows",
     "histograms":    {name: {"edges": [...], "counts": [...]}}    token_length, confidence, ... (task's)
     "distributions": {name: {category: count}}                     script, predicted_label, ... (task's)
     "counts":        {"truncated_rows", "unknown_tokens", "content_tokens"}   what the shares are made of (merge adds them)
     "shares":        {"truncated": x, "unknown": y}                 rows truncated; unknown tokens / content tokens
     "gold":          {name: {category: count}}                      reference only: label / entity-type counts
     "embedding":     {"dim", "rows", "sample": [[...], ...]}}       a seeded fixed-size sample (features.embed)

What is particular to a task (which prediction fields, entity rates for NER) comes from its
`profile_outputs` / `profile_gold` (kubetune.tasks); everything here works on any task. The token
ids and predictions come from the one prediction path (kubetune.tasks.predictor), so a reference
profile, a batch's profile and serving's request log all see the inputs the model saw.
"""

from __future__ import annotations

import numpy as np

from kubetune.monitoring import features

FORMAT = 1
EMBED_SAMPLE = 500  # rows kept for the domain classifier: ~200 kB of JSON at 64 dims
CONFIDENCE_EDGES = [round(x, 2) for x in np.linspace(0, 1, 11)]


def length_edges(max_length: int) -> list[int]:
    """Token-length bins: powers of two up to max_length, the last bin holding the truncated rows."""
    edges = [0] + [2**k for k in range(2, 16) if 2**k < max_length]
    return edges + [max_length, max_length + 1]


def histogram(values, edges: list) -> dict:
    """Counts of `values` in [edges[i], edges[i+1]) (the last bin closed); values outside are clipped in."""
    v = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return {"edges": list(edges), "counts": np.histogram(v, bins=np.asarray(edges, dtype=np.float64))[0].astype(int).tolist()}


def build(predictor, texts: list, *, gold=None, scored: list | None = None, batch_size: int = 64, sample: int = EMBED_SAMPLE,
          seed: int = 0) -> dict:
    """The profile of `texts` and of `predictor`'s predictions on them (kubetune.tasks.predictor: an
    exported model or a torch one); `scored`: `predictor.score(texts)` when already run (token ids and
    predictions are then reused, nothing is tokenized again); `gold`: the split's frame for the
    reference-only gold distributions."""
    task, tokenizer, max_length = predictor.task, predictor.tokenizer, predictor.max_length
    if scored is None:
        scored = predictor.score(texts, batch_size)
    rows, truncated = [s.ids for s in scored], np.array([s.truncated for s in scored], dtype=bool)
    special = features.special_ids(tokenizer)
    unk, content = features.unknown_counts(rows, tokenizer.unk_token_id, special)
    outputs = task.profile_outputs([s.prediction for s in scored], predictor.labels)
    pick = np.random.default_rng(seed).permutation(len(rows))[:sample]
    embedding = features.embed([rows[i] for i in sorted(pick)], special)
    return {
        "format": FORMAT, "task": task.name, "labels": list(predictor.labels), "max_length": max_length, "rows": len(texts),
        "histograms": {"token_length": histogram([len(r) for r in rows], length_edges(max_length)),
                       **{k: histogram(v, edges) for k, (v, edges) in outputs["histograms"].items()}},
        "distributions": {"script": features.script_counts([features.flat(t) for t in texts]), **outputs["distributions"]},
        "counts": {"truncated_rows": int(truncated.sum()), "unknown_tokens": int(unk.sum()), "content_tokens": int(content.sum())},
        "shares": shares(len(texts), int(truncated.sum()), int(unk.sum()), int(content.sum())),
        "gold": task.profile_gold(gold, predictor.labels) if gold is not None else {},
        "embedding": {"dim": features.EMBED_DIM, "rows": len(embedding), "sample": np.round(embedding, 4).tolist()},
    }


def text_features(tokenizer, texts: list, scored: list) -> list[dict]:
    """Per input, what `build` reads from the input and its token ids (`scored`: the predictor's
    Scored items, whose ids are reused), so a profile can be built later without the text (serving's
    features-mode request log): `from_features` of these equals `build` of the texts."""
    rows = [s.ids for s in scored]
    special = features.special_ids(tokenizer)
    unk, content = features.unknown_counts(rows, tokenizer.unk_token_id, special)
    emb = np.round(features.embed(rows, special), 4)
    return [{"token_length": len(s.ids), "truncated": bool(s.truncated), "unknown_tokens": int(u), "content_tokens": int(c),
             "scripts": {k: v for k, v in features.script_counts([features.flat(x)]).items() if v},
             "embedding": e.tolist()} for x, s, u, c, e in zip(texts, scored, unk, content, emb)]


def from_features(task, labels: list[str], max_length: int, feats: list[dict], predictions: list[dict],
                  sample: int = EMBED_SAMPLE, seed: int = 0) -> dict:
    """The profile `build` gives, made from `text_features` records and the predictions made then."""
    outputs = task.profile_outputs(predictions, labels)
    pick = np.random.default_rng(seed).permutation(len(feats))[:sample]
    scripts = dict.fromkeys(features.SCRIPTS, 0)
    for f in feats:
        for k, v in f["scripts"].items():
            scripts[k if k in scripts else "other"] += int(v)
    truncated = sum(bool(f["truncated"]) for f in feats)
    unk, content = sum(int(f["unknown_tokens"]) for f in feats), sum(int(f["content_tokens"]) for f in feats)
    return {
        "format": FORMAT, "task": task.name, "labels": list(labels), "max_length": max_length, "rows": len(feats),
        "histograms": {"token_length": histogram([f["token_length"] for f in feats], length_edges(max_length)),
                       **{k: histogram(v, edges) for k, (v, edges) in outputs["histograms"].items()}},
        "distributions": {"script": scripts, **outputs["distributions"]},
        "counts": {"truncated_rows": truncated, "unknown_tokens": unk, "content_tokens": content},
        "shares": shares(len(feats), truncated, unk, content),
        "gold": {},
        "embedding": {"dim": features.EMBED_DIM, "rows": len(pick), "sample": [feats[i]["embedding"] for i in sorted(pick)]},
    }


def shares(rows: int, truncated_rows: int, unknown_tokens: int, content_tokens: int) -> dict:
    return {"truncated": round(truncated_rows / rows, 4) if rows else 0.0,
            "unknown": round(unknown_tokens / content_tokens, 4) if content_tokens else 0.0}


def merge(profiles: list[dict], sample: int = EMBED_SAMPLE, seed: int = 0) -> dict:
    """One profile of the union of the data of `profiles` (e.g. the shards of a batch): counts add
    up, shares are recomputed from them, the embedding sample is a seeded sample of the shards'
    samples, each shard weighted by its rows."""
    first = profiles[0]
    out = {k: first[k] for k in ("format", "task", "labels", "max_length")}
    out["rows"] = sum(p["rows"] for p in profiles)
    out["histograms"] = {name: {"edges": h["edges"], "counts": np.sum([p["histograms"][name]["counts"] for p in profiles], 0).tolist()}
                         for name, h in first["histograms"].items()}
    out["distributions"] = {name: {k: sum(p["distributions"][name].get(k, 0) for p in profiles)
                                   for k in dict.fromkeys(k for p in profiles for k in p["distributions"][name])}
                            for name in first["distributions"]}
    out["counts"] = {k: sum(p["counts"][k] for p in profiles) for k in first["counts"]}
    out["shares"] = shares(out["rows"], **out["counts"])
    out["gold"] = {}
    rng = np.random.default_rng(seed)
    rows = [(r, p["rows"] / max(len(p["embedding"]["sample"]), 1)) for p in profiles for r in p["embedding"]["sample"]]
    weights = np.array([w for _, w in rows], dtype=np.float64)
    pick = rng.choice(len(rows), size=min(sample, len(rows)), replace=False, p=weights / weights.sum()) if rows else []
    out["embedding"] = {"dim": first["embedding"]["dim"], "rows": len(pick), "sample": [rows[i][0] for i in sorted(pick)]}
    return out
