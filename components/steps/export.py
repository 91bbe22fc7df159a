"""Step 5 - export: the fine-tuned model to ONNX, checked against torch before anything uses it.

    python -m kubetune.steps.export --model /tmp/kt/model --tokens /tmp/kt/tokens --out /tmp/kt/onnx \
        --variants fp32,optimized,int8 --store ./kubetune-store --run-id dev

The graph comes from torch's TorchScript exporter with dynamic batch and sequence axes (about a
second; the graph ONNX Runtime's transformer fusions recognise), or, where that exporter fails or
is gone from torch, from torch.export (`dynamo=True`, several seconds); the record names which.
Exported once: every variant is built from that graph.

Torch runs once, over up to `check_rows` held-out (eval) rows; its logits are the reference of
everything after. Parity: the fp32 graph on those rows at batch size 32 (padded) and on the first
`parity_rows` one at a time (unpadded); the step fails when the largest logit difference exceeds
`parity_atol` or the argmax agreement falls below `min_agreement` (token classification: over every
real token of those rows, per-token argmax). The output folder carries
everything inference needs (see kubetune.onnx.model): model.onnx, tokenizer, labels, settings.

Variants (`variants`, default fp32,optimized,int8; see kubetune.onnx.variants): each requested one is
built and checked on up to `check_rows` eval rows against torch (on the rows torch decides by a softmax
margin >= agreement_margin, no more flips than a flip rate of 1 - min_agreement explains, by a
binomial test; accuracy drop <= max_accuracy_drop).
fp32 failing fails the step. The others are best-effort: a failing one is dropped and reported (log,
export record `rejected_variants`, run summary, model card, KFP metrics) and fp32 plus the passing
ones are published; `require_variants` makes a failing variant fail the step with exit 3, like the gate.
kubetune.json lists the accepted variants, which the registry version then carries.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args, opt, param
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import log
from kubetune.errors import ConfigError, KubetuneError
from kubetune.onnx.model import OnnxClassifier
from kubetune.onnx.variants import accept_variants, example_inputs, parse_variants, torchscript_export
from kubetune.storage.contracts import ModelSettings, TokensMeta, write_labels
from kubetune.storage.shards import load_split
from kubetune.storage.space import is_disk_full, parameter_bytes, writing
from kubetune.training.modeling import TorchBackend

STEP = "export"
# what kubetune.json keeps of each variant's check
VARIANT_FIELDS = ("file", "rows", "agreement", "decided_rows", "decided_agreement", "flips", "accuracy", "torch_accuracy", "accuracy_drop",
                  "size_bytes", "kernels")


class ParityError(KubetuneError):
    kind = "parity"


@dataclass(frozen=True)
class ExportConfig:
    opset: int = opt(18, "ONNX opset version of the exported graph.")
    parity_rows: int = opt(64, "Eval rows on which torch and ONNX Runtime (fp32) logits are also compared one row at a time "
                               "(every checked row is compared at batch size 32).")
    parity_atol: float = opt(1e-3, "Largest |torch logit - ONNX logit| (fp32 vs fp32) the parity check allows; more: the export "
                                   "fails.")
    min_agreement: float = opt(0.995, "Smallest share of rows (NER: tokens) whose argmax agrees with torch in the parity check; "
                                      "a variant is rejected when its flips on the rows torch decides by --agreement-margin are more "
                                      "than a flip rate of 1 - min_agreement explains (binomial test, p < 0.05).")
    device: str = opt("cpu", "ONNX Runtime provider for the parity and variant checks: cpu or cuda.")
    variants: str = param("fp32,optimized,int8", "Comma-separated ONNX variants: fp32 (required), optimized, int8 (CPU), fp16 (GPU); "
                          "each passes a held-out check.", name="onnx_variants")
    require_variants: bool = param(False, "Fail the export (exit 3, like the gate) when a requested ONNX variant fails its "
                                          "check; default: a failing variant other than fp32 is dropped and reported.")
    max_accuracy_drop: float = opt(0.005, "How far a variant's eval accuracy may fall below torch's (0.005 = half a point); "
                                          "more: the variant is rejected.")
    # agreement counts the rows torch decides by at least this softmax margin (top-1 minus top-2): a
    # flip of a near-tie row is harmless; the accuracy bound still covers every row
    agreement_margin: float = opt(0.1, "A variant's argmax agreement counts the rows torch decides by at least this softmax "
                                       "margin (top-1 minus top-2 probability); its accuracy bound covers every row.")
    check_rows: int = opt(2000, "Eval rows each variant is checked on (all when fewer).")

    def check(self) -> None:
        if self.parity_rows < 1 or self.check_rows < 1:
            raise ConfigError("parity_rows and check_rows must be >= 1: an export is never published unchecked")
        if not 0 < self.min_agreement <= 1:
            raise ConfigError(f"min_agreement={self.min_agreement}: must be in (0, 1]")
        if not 0 <= self.max_accuracy_drop < 1:
            raise ConfigError(f"max_accuracy_drop={self.max_accuracy_drop}: must be in [0, 1) (0.005 = half a point)")
        if not 0 <= self.agreement_margin < 1:
            raise ConfigError(f"agreement_margin={self.agreement_margin}: must be in [0, 1) (a softmax probability gap)")
        parse_variants(self.variants)


def export_graph(model, input_names: list[str], path: Path, opset: int, axes: tuple[str, ...]) -> str:
    """The model as an ONNX graph at `path` with dynamic `axes` (the task's input_axes) on every
    input; returns which exporter made it (the TorchScript one, else torch.export)."""
    try:
        torchscript_export(model, input_names, path, opset, axes)
        return "torchscript exporter"
    except Exception as e:  # noqa: BLE001 - any exporter failure: the other exporter, and the record says so
        if is_disk_full(e, path):
            raise  # the other exporter would fill the same disk
        log(STEP, f"the TorchScript exporter failed ({type(e).__name__}: {str(e)[:200]}); exporting with torch.export instead")
        path.unlink(missing_ok=True)
        export_onnx(model, input_names, path, opset, axes)
        return "torch.export"


def export_onnx(model, input_names: list[str], path: Path, opset: int, axes: tuple[str, ...] = ("batch", "sequence")) -> None:
    """The model as a torch.export (dynamo) ONNX graph with dynamic `axes` on every input."""
    import torch

    kwargs = example_inputs(input_names, axes)
    dims = [torch.export.Dim(a) for a in axes]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; failures still raise
        program = torch.onnx.export(
            model.eval(), (), kwargs=kwargs, input_names=list(kwargs), output_names=["logits"],
            dynamic_shapes={k: dict(enumerate(dims)) for k in kwargs}, opset_version=opset, dynamo=True,
            external_data=False, verbose=False,
        )
    program.save(str(path))


def check_parity(reference: np.ndarray, clf: OnnxClassifier, split, cfg: ExportConfig) -> tuple[dict, np.ndarray]:
    """torch's logits (`reference`, on `split`) vs ONNX Runtime's fp32 graph: every row at batch 32
    (the padded path), and the first `parity_rows` rows one at a time (the unpadded path). Returns
    the report and the batch-32 logits, which are also the fp32 variant's check."""
    per_token = clf.task.per_token  # token classification: every real token of every row, end to end
    first = split.take(np.arange(min(cfg.parity_rows, len(split))))
    report = {"rows": len(split), "tokens": int(split.lengths.sum()), "split": "eval"}
    padded = clf.logits(split, batch_size=32, per_token=per_token)
    worst, agree = 0.0, 1.0
    for batch, rows, got in ((32, split, padded), (1, first, clf.logits(first, batch_size=1, per_token=per_token))):
        want = reference[:len(got)]  # a prefix of rows is a prefix of the logits (per token: in row order)
        diff = float(np.abs(got - want).max())
        share = float((got.argmax(-1) == want.argmax(-1)).mean())
        report[f"batch_{batch}"] = {"rows": len(rows), "max_abs_diff": diff, "argmax_agreement": share}
        worst, agree = max(worst, diff), min(agree, share)
    report.update(max_abs_diff=worst, argmax_agreement=agree,
                  passed=worst <= cfg.parity_atol and agree >= cfg.min_agreement,
                  parity_atol=cfg.parity_atol, min_agreement=cfg.min_agreement)
    return report, padded


def export(model_dir: Path, tokens_dir: Path, out_dir: Path, cfg: ExportConfig, work: Path) -> dict:
    """Export, check parity, build and check the variants; `work` is scratch space for the builds."""
    import onnx
    import torch
    from transformers.utils import logging as hf_logging

    cfg.check()
    wanted = parse_variants(cfg.variants)
    hf_logging.disable_progress_bar()
    meta = TokensMeta.read(tokens_dir)
    inputs, task = meta.inputs, tasks.get(meta.task)
    names = list(inputs.input_names)
    model = task.model_class().from_pretrained(model_dir).float().to("cpu").eval()

    # ---- graph -------------------------------------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    with writing(onnx_path, "the ONNX graph model.onnx", parameter_bytes(model)):
        exporter = export_graph(model, names, onnx_path, cfg.opset, task.input_axes)
    onnx.checker.check_model(str(onnx_path))
    log(STEP, f"exported {onnx_path.stat().st_size / 2**20:.1f} MiB with the {exporter}, opset {cfg.opset}, "
              f"dynamic {', '.join(task.input_axes)} axes")

    # ---- what travels with the graph ---------------------------------------------------------
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.txt", "config.json"):
            shutil.copy2(f, out_dir / f.name)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    write_labels(out_dir, labels)
    settings = ModelSettings(task.name, inputs, opset=cfg.opset, torch=torch.__version__)
    settings.write(out_dir)

    # ---- one torch pass over the held-out (eval) rows: the reference of the parity and every variant check
    held_out = load_split(tokens_dir, "eval")
    held_out = held_out.take(np.arange(min(cfg.check_rows, len(held_out))))
    reference = TorchBackend(model, inputs, torch.device("cpu")).logits(held_out, 32, task.per_token)

    # ---- parity: the fp32 graph against torch ------------------------------------------------
    clf = OnnxClassifier(out_dir, device=cfg.device, variant="fp32")
    parity, fp32_logits = check_parity(reference, clf, held_out, cfg)
    (out_dir / "parity.json").write_text(json.dumps(parity, indent=2))
    log(STEP, f"parity on {parity['rows']} eval rows: max |logit diff| {parity['max_abs_diff']:.2e}, "
              f"argmax agreement {parity['argmax_agreement']:.4f}")
    if not parity["passed"]:
        raise ParityError(
            f"ONNX parity failed: max |logit diff| {parity['max_abs_diff']:.3e} (limit {cfg.parity_atol}), argmax agreement "
            f"{parity['argmax_agreement']:.4f} (minimum {cfg.min_agreement}); the export is not published"
        )

    # ---- variants, each checked on the same rows (fp32's logits are the parity's) ------------
    variants, rejected = accept_variants(model, out_dir, wanted, held_out, reference, origin=exporter, device=cfg.device,
                                         min_agreement=cfg.min_agreement, max_accuracy_drop=cfg.max_accuracy_drop, work=work,
                                         margin=cfg.agreement_margin, required=cfg.require_variants, scored={"fp32": (clf, fp32_logits)})
    settings.with_variants({k: {f: v[f] for f in VARIANT_FIELDS} for k, v in variants.items()},
                           {k: {**{f: v[f] for f in VARIANT_FIELDS if f != "file"}, "problems": v["problems"]}
                            for k, v in rejected.items()}).write(out_dir)
    parity.update(variants=variants, rejected_variants=rejected, exporter=exporter)
    (out_dir / "parity.json").write_text(json.dumps(parity, indent=2))
    return {**parity, "size_bytes": onnx_path.stat().st_size, "opset": cfg.opset}


def run_step(*, store_uri: str, run_id: str, model_dir: Path, tokens_dir: Path, out_dir: Path, out_uri: str, cfg: ExportConfig) -> dict:
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config=asdict(cfg)) as ctx:
        result = export(model_dir, tokens_dir, out_dir, cfg, ctx.scratch)
        result["uri"] = out_uri or str(out_dir)
        ctx.record.write_json("export.json", result)
        ctx.outputs.update(uri=result["uri"], max_abs_diff=result["max_abs_diff"], argmax_agreement=result["argmax_agreement"],
                           variants=sorted(result["variants"]), rejected_variants=sorted(result["rejected_variants"]))
    return result


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.export", __doc__)
    p.add_argument("--model", required=True, type=Path, help="fine-tuned model folder (finetune's output)")
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    add_config_args(p, ExportConfig)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, model_dir=a.model, tokens_dir=a.tokens,
                                     out_dir=a.out, out_uri="", cfg=config_from_args(ExportConfig, a)))


if __name__ == "__main__":
    sys.exit(main())
