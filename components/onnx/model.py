"""An exported model folder, loaded for inference with ONNX Runtime.

Folder layout (written by kubetune.steps.export, published by kubetune.steps.deploy):
  model.onnx        inputs input_ids / attention_mask [/ token_type_ids], int64 [batch, sequence]
                    (multiple choice: [batch, choices, sequence]); output logits float32 [batch,
                    num_labels] (token classification: [batch, sequence, num_labels]; multiple
                    choice: [batch, choices])
  tokenizer.json, tokenizer_config.json, ...   the fast tokenizer
  labels.json       {"labels": [...]} in logit order
  kubetune.json     task, max_length, truncation (head | tail | head+tail), input names, base model, opset, and `variants`

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

`OnnxClassifier` is a kubetune.tasks.predictor.Predictor: `predict(texts)` / `score(texts)` are the one
prediction path of serving, batch inference and the gate's champion scoring; what it answers is
the task's (kubetune.tasks, from `kubetune.json`'s task): {"label", "score", "probabilities"} for a
sequence classifier, {"entities": [...]} with character offsets for a token classifier.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from kubetune.errors import ConfigError, InputError
from kubetune.storage.contracts import ModelInputs, ModelSettings, read_labels
from kubetune.storage.shards import TokenizedSplit, logit_rows, logit_width, pad_batch, place_logits, sorted_batches, token_types
from kubetune.tasks.predictor import Predictor

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
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=PROVIDERS[device])
    except Exception as e:  # ORT's own types (InvalidProtobuf, Fail, ...): a junk or truncated file, one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{model_path}: ONNX Runtime cannot load it ({first[:300]}); the file is damaged or incomplete - "
                         "export or download the model again") from e
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
    return ModelSettings.read(model_dir).accepted()


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


class OnnxBackend:
    """Logits from an ONNX Runtime session (kubetune.tasks.predictor.Backend)."""

    def __init__(self, session, inputs: ModelInputs, num_labels: int):
        self.session, self.inputs, self.num_labels = session, inputs, num_labels
        self.segments = "token_type_ids" in inputs.input_names

    def _run(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if self.segments:
            feed["token_type_ids"] = token_types(input_ids, mask, self.inputs.sep_token_id)
        return self.session.run(["logits"], feed)[0]

    def logits(self, split: TokenizedSplit, batch_size: int = 64, per_token: bool = False) -> np.ndarray:
        """Logits in row order, [rows, labels]; with `per_token` every real token's logits end to end,
        [tokens, labels] (row i at split.offsets[i]:split.offsets[i + 1]), as
        kubetune.training.modeling.predict_logits gives them for the torch model."""
        out = np.zeros((logit_rows(split, per_token), logit_width(split, self.num_labels)), dtype=np.float32)
        for index in sorted_batches(split.lengths, batch_size):
            place_logits(out, split, index, self._run(*pad_batch(split, index, self.inputs.pad_token_id)), per_token)
        return out


class OnnxClassifier(Predictor):
    """An exported model folder as a Predictor (kubetune.tasks.predictor): its tokenizer, its settings
    (kubetune.json) and an ONNX Runtime session of one variant."""

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0, variant: str = "auto", unchecked: bool = False):
        from transformers import AutoTokenizer

        from kubetune import tasks

        if not (model_dir / "model.onnx").is_file():
            raise InputError(f"{model_dir}: no model.onnx; expected a folder written by kubetune export")
        self.dir = model_dir
        self.settings = ModelSettings.read(model_dir, tasks.DEFAULT)  # folders exported before task families: sequence
        labels = read_labels(model_dir)
        task = tasks.get(self.settings.task)
        self.variant = pick_variant(model_dir, variant, device, unchecked)
        self.session = create_session(model_dir / variant_file(self.variant), device, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        inputs = replace(self.settings.inputs, input_names=tuple(self.input_names), pad_token_id=tokenizer.pad_token_id)
        super().__init__(task, tokenizer, labels, inputs, OnnxBackend(self.session, inputs, len(labels)))

    @property
    def kernels(self) -> str:
        """The path this session runs: the CUDA provider, or the CPU kernel family ONNX Runtime
        dispatches this variant to on this machine's CPU (read at run time: AMX, AVX-512 VNNI, AVX2...)."""
        from kubetune.core.system import cpu_features, cpu_kernels

        provider = self.session.get_providers()[0]
        if provider != "CPUExecutionProvider":
            return f"{self.variant} on {provider}"
        return cpu_kernels(self.variant, cpu_features()["flags"])
