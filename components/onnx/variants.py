"""ONNX variants of an exported model, built from the fp32 graph and each accepted only after a
check on held-out rows. Used by the export step (kubetune.steps.export):

    python -m kubetune.steps.export --model /tmp/kt/model --tokens /tmp/kt/tokens --out /tmp/kt/onnx \
        --variants fp32,optimized,int8 --store ./kubetune-store --run-id dev

  fp32       the exported graph (kubetune.steps.export: the TorchScript exporter's, whose patterns
             the optimizer fuses fully; torch.export's where that exporter fails). Every variant is
             built from it: one export.
  optimized  ONNX Runtime's transformer optimizer (onnxruntime.transformers.optimizer): attention,
             SkipLayerNormalization, GELU and embedding fusions, still fp32. Any device.
  fp16       the optimized graph converted to float16, inputs and outputs kept int64/float32. For
             CUDA (OnnxClassifier picks it only there). Its check runs on the export's device: on a
             GPU node (`device=cuda`) with the CUDA kernels it will serve with; on CPU, ONNX Runtime
             runs it through inserted fp32 casts (slower than fp32, but a real check of the fp16
             weights and activations between ops), and the record names the provider it ran on.
  int8       the optimized graph with int8 dynamic quantization (weights int8 per channel,
             activations quantized at run time). For CPU.

The check (per variant, fp32 included): on the eval split, the variant's argmax must agree with the
torch model on the rows that torch decides by a margin (top-1 minus top-2 softmax probability >=
`margin`) as well as a variant flipping `1 - min_agreement` of them would (0.5%): it is rejected
when a binomial test says its flips are more than that rate explains (p < FLIP_SIGNIFICANCE, 0.05).
So the rule means the same at every size: on 179 rows one flip (0.56%) passes (p = 0.59) and four
fail; on 2,000 rows up to 15 flips pass (0.75%: 10 are expected at 0.5%). A plain "agreement >=
99.5%" let a single flip reject a variant on any split under 200 rows. Its accuracy must not be
more than `max_accuracy_drop` below torch's. Rows near the decision boundary are left out of the agreement on purpose: a
weak-but-useful model has many, and int8 flipping a coin-toss row there is expected and harmless
(the accuracy bound still counts every row). The agreement over all rows is reported too.

fp32 is the reference graph: if it fails, the step fails (VariantRejected, exit 1). Any other
variant is best-effort unless `required`: a failing one is dropped (its file removed, its numbers
kept under `rejected` in the record and logged), and fp32 plus the passing variants are published.
With `required` a failing variant fails the step with exit 3, like the quality gate
(RequiredVariantRejected). Nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import warnings
from pathlib import Path

import numpy as np

from kubetune.core.progress import log
from kubetune.errors import ConfigError, GateRejected, KubetuneError
from kubetune.onnx.model import VARIANTS, OnnxClassifier, variant_file
from kubetune.storage.shards import IGNORE, TokenizedSplit

STEP = "export"
# a variant is rejected for its flips when a variant flipping exactly 1 - min_agreement of the rows
# would make that many or more with less than this probability (a one-sided binomial test)
FLIP_SIGNIFICANCE = 0.05


class VariantRejected(KubetuneError):
    """The fp32 graph failed its check against torch (exit 1: something is broken)."""

    kind = "variant"


class RequiredVariantRejected(GateRejected):
    """A variant the user required (`require_variants`) failed its check: exit 3, like the gate."""

    kind = "variant"


def decision_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability of each row (1.0 for a single-label output)."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if p.shape[-1] < 2:
        return np.ones(p.shape[:-1])
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def flip_p_value(flips: int, rows: int, rate: float) -> float:
    """P(X >= flips) for X ~ Binomial(rows, rate): how likely a variant whose true flip rate is `rate`
    flips at least this many of `rows` rows. Small: the flips are more than that rate explains."""
    if flips <= 0:
        return 1.0
    if rate <= 0:
        return 0.0
    below = sum(math.exp(math.lgamma(rows + 1) - math.lgamma(i + 1) - math.lgamma(rows - i + 1) + i * math.log(rate)
                         + (rows - i) * math.log1p(-rate)) for i in range(flips))
    return max(0.0, 1.0 - below)


def parse_variants(spec: str) -> list[str]:
    """'fp32,optimized,int8' -> ['fp32', 'optimized', 'int8'], checked: known names, fp32 present
    (the reference graph, the one parity is measured on)."""
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"variants {spec!r}: unknown {', '.join(unknown)}; use a comma-separated subset of {', '.join(VARIANTS)}")
    if "fp32" not in names:
        raise ConfigError(f"variants {spec!r}: must include fp32, the reference graph every other variant is built from")
    return list(dict.fromkeys(names))


def example_inputs(input_names: list[str], axes: tuple[str, ...]) -> dict:
    """Example model inputs for an exporter, shaped by `axes` ([batch, sequence], or [batch, choices,
    sequence] for multiple choice): rows (and choices) of different lengths, so the exporter
    specialises on no size (small ids exist in every vocabulary; the values do not shape the graph)."""
    import torch

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 0, 0, 0]], dtype=torch.long)
    mask = (ids > 0).long()
    if len(axes) == 3:  # three choices, the middle one shorter
        ids, mask = ids[:, None, :].repeat(1, 3, 1), mask[:, None, :].repeat(1, 3, 1)
        ids[:, 1, 4:], mask[:, 1, 4:] = 0, 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in input_names}


def torchscript_export(model, input_names: list[str], path: Path, opset: int, axes: tuple[str, ...]) -> None:
    """The TorchScript exporter's graph with dynamic `axes`: ONNX Runtime's optimizer recognises its
    attention and embedding patterns (6 Attention + EmbedLayerNormalization on MiniLM), which it does
    not in the torch.export graph (SkipLayerNormalization and BiasGelu only), and it exports in about
    a second where torch.export takes several. Every graph is checked against torch before it is
    accepted, so which exporter produced it does not change what is published."""
    import torch

    feeds = example_inputs(input_names, axes)
    # eager attention: SDPA traces to a graph the attention fusion does not match
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        restore.callback(model.set_attn_implementation, previous)
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        with torch.inference_mode():
            out_dims = model(**feeds).logits.ndim  # [batch, labels]; token classification [batch, sequence, labels]
        dims = dict(enumerate(axes))
        axes_of = {k: dims for k in feeds}
        # the logits keep the inputs' leading axes: batch, and sequence (per token) or choices
        axes_of["logits"] = dims if out_dims == 3 else {0: "batch", 1: axes[1]} if len(axes) == 3 else {0: "batch"}
        torch.onnx.export(model.eval(), (), str(path), kwargs=feeds, input_names=list(feeds), output_names=["logits"],
                          dynamic_axes=axes_of, opset_version=opset, dynamo=False)


def _optimize(model, fp32: Path) -> tuple:
    """(optimizer model, fused op counts): ONNX Runtime's transformer fusions over the fp32 graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # per-fusion chatter
    cfg = model.config
    # opt_level 0: only the transformer fusions go into the file; ONNX Runtime applies its own
    # device-specific graph optimizations when a session loads it
    opt = optimize_model(str(fp32), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size, opt_level=0)
    # stale shape annotations from the exporter break the quantizer's shape inference
    del opt.model.graph.value_info[:]
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return opt, fused


def build_variants(model, out_dir: Path, wanted: list[str], work: Path, origin: str) -> dict[str, dict]:
    """Write every wanted variant next to model.onnx in `out_dir`, each built from that one exported
    graph (`origin`: which exporter made it); returns {name: build facts}. The optimized graph is
    built whenever a variant derives from it, but only kept when asked for."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    facts: dict[str, dict] = {"fp32": {"source": origin}}
    if wanted == ["fp32"]:
        return facts
    work.mkdir(parents=True, exist_ok=True)
    opt, fused = _optimize(model, out_dir / "model.onnx")
    log(STEP, f"optimized (from the {origin}'s graph): fused {', '.join(f'{v} {k}' for k, v in fused.items()) or 'nothing'}")
    optimized = work / variant_file("optimized")
    opt.save_model_to_file(str(optimized))
    built = {"source": origin, "fused": fused}
    if "optimized" in wanted:
        shutil.copy2(optimized, out_dir / optimized.name)
        facts["optimized"] = built
    if "int8" in wanted:
        # per-channel int8 weights keep the accuracy of the small classifier/attention matrices;
        # DefaultTensorType: the fused contrib ops carry no type the quantizer's inference knows
        quantize_dynamic(str(optimized), str(out_dir / variant_file("int8")), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        facts["int8"] = {**built, "quantization": "dynamic, int8 weights per channel"}
    if "fp16" in wanted:
        opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(out_dir / variant_file("fp16")))
        facts["fp16"] = built
    return facts


def check_variant(name: str, clf: OnnxClassifier, split: TokenizedSplit, reference: np.ndarray, min_agreement: float,
                  max_accuracy_drop: float, margin: float = 0.0, got: np.ndarray | None = None) -> dict:
    """Agreement with torch (on the rows torch decides by at least `margin`, see the module
    docstring) and accuracy against the labels on `split`; `passed` and why not. The logit rows are
    the task's (`clf.task`): one per text, or for token classification every real token end to end,
    so agreement is per token and accuracy per labelled token. `got`: the variant's logits on
    `split` at batch 32 when already computed (fp32's come from the parity check)."""
    if got is None:
        got = clf.logits(split, batch_size=32, per_token=clf.task.per_token)
    targets = clf.task.targets(split)
    return {"file": variant_file(name), **judge_variant(got, targets, reference, min_agreement, max_accuracy_drop, margin),
            "size_bytes": (clf.dir / variant_file(name)).stat().st_size, "provider": clf.session.get_providers()[0],
            "kernels": clf.kernels}


def judge_variant(got: np.ndarray, targets: np.ndarray, reference: np.ndarray, min_agreement: float, max_accuracy_drop: float,
                  margin: float) -> dict:
    """The check's numbers from a variant's logits `got`, torch's `reference` and the labels."""
    keep = targets != IGNORE
    same = got.argmax(-1) == reference.argmax(-1)
    decided = decision_margin(reference) >= margin
    agreement = float(same.mean())
    decided_agreement = float(same[decided].mean()) if decided.any() else 1.0
    accuracy = float((got.argmax(-1) == targets)[keep].mean())
    torch_accuracy = float((reference.argmax(-1) == targets)[keep].mean())
    drop = torch_accuracy - accuracy
    problems = []
    rows, flips = int(decided.sum()), int((~same[decided]).sum())
    p_value = flip_p_value(flips, rows, 1 - min_agreement)
    if p_value < FLIP_SIGNIFICANCE:
        problems.append(f"argmax agreement {decided_agreement:.4f} on the {rows} rows torch decides by a margin >= {margin}: {flips} "
                        f"flip(s), more than a {100 * (1 - min_agreement):.2g}% flip rate explains (p = {p_value:.3g} < "
                        f"{FLIP_SIGNIFICANCE}; all rows: {agreement:.4f})")
    if drop > max_accuracy_drop + 1e-12:
        problems.append(f"accuracy {accuracy:.4f} vs torch {torch_accuracy:.4f} drops {100 * drop:.2f} points > {100 * max_accuracy_drop:.2f}")
    return {"rows": len(same), "agreement": agreement, "decided_rows": rows, "decided_agreement": decided_agreement, "flips": flips,
            "flip_p_value": p_value,
            "margin": margin, "accuracy": accuracy, "torch_accuracy": torch_accuracy, "accuracy_drop": drop,
            "max_abs_diff": float(np.abs(got - reference).max()), "passed": not problems, "problems": problems}


def accept_variants(model, out_dir: Path, wanted: list[str], split: TokenizedSplit, reference: np.ndarray, *, origin: str,
                    device: str, min_agreement: float, max_accuracy_drop: float, work: Path, margin: float = 0.0,
                    required: bool = False, scored: dict | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Build, check and record the variants: (accepted, rejected), each {name: check record}. fp32
    failing raises VariantRejected; another variant failing raises RequiredVariantRejected when
    `required`, else it is dropped (file removed) and returned in `rejected`."""
    if "fp16" in wanted and device != "cuda":
        log(STEP, "fp16 is a GPU variant: its check runs on the CPU provider here (through casts), not on the CUDA kernels it serves with")
    facts = build_variants(model, out_dir, wanted, work, origin)
    return judge_variants(out_dir, facts, split, reference, device=device, min_agreement=min_agreement,
                          max_accuracy_drop=max_accuracy_drop, margin=margin, required=required, scored=scored)


def judge_variants(out_dir: Path, facts: dict[str, dict], split: TokenizedSplit, reference: np.ndarray, *, device: str,
                   min_agreement: float, max_accuracy_drop: float, margin: float, required: bool,
                   scored: dict | None = None) -> tuple[dict, dict]:
    """Check the built variants (`facts`: {name: build facts}, fp32 first) and apply the rules of the
    module docstring: (accepted, rejected); a dropped variant's file is removed from `out_dir`.
    `scored`: {name: (classifier, its logits on `split`)} already computed, not run again."""
    wanted = list(facts)
    results = {}
    for name in wanted:
        clf, got = (scored or {}).get(name) or (OnnxClassifier(out_dir, device=device, variant=name, unchecked=True), None)
        results[name] = {**check_variant(name, clf, split, reference, min_agreement, max_accuracy_drop, margin, got), **facts[name]}
        r = results[name]
        log(STEP, f"variant {name:<9} {'accepted' if r['passed'] else 'REJECTED'}: agreement {r['decided_agreement']:.4f} on "
                  f"{r['decided_rows']} decided rows ({r['agreement']:.4f} on all {r['rows']}), accuracy {r['accuracy']:.4f} "
                  f"(torch {r['torch_accuracy']:.4f}), {r['size_bytes'] / 2**20:.1f} MiB")
    failed = {k: v for k, v in results.items() if not v["passed"]}
    why = "; ".join(f"{k}: {', '.join(v['problems'])} ({v['rows']} rows)" for k, v in failed.items())
    if "fp32" in failed:
        raise VariantRejected(f"ONNX variant check failed on the eval split: {why}; nothing is published")
    if failed and required:
        raise RequiredVariantRejected(f"ONNX variant check failed on the eval split: {why}; require_variants is set, so nothing "
                                      "is published (without it, failing variants are dropped and fp32 is published)")
    for name in failed:
        (out_dir / variant_file(name)).unlink(missing_ok=True)  # never published: only accepted files travel
        log(STEP, f"variant {name} dropped (best-effort; --require-variants makes this fail the step): {', '.join(failed[name]['problems'])}")
    return {k: v for k, v in results.items() if v["passed"]}, failed
