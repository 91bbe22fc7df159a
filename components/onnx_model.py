"""An exported model folder, loaded for inference with ONNX Runtime.

Folder layout (written by components.export, published by components.deploy):
  model.onnx        inputs input_ids / attention_mask [/ token_type_ids], int64 [batch, sequence];
                    output logits float32 [batch, num_labels]
  tokenizer.json, tokenizer_config.json, ...   the fast tokenizer
  labels.json       {"labels": [...]} in logit order
  kubetune.json     task, max_length, input names, base model, opset

Execution providers are explicit: asking for CUDA on a machine where ONNX Runtime cannot load it
(no GPU, missing CUDA/cuDNN libraries) is an error naming the providers it has, never a silent
fallback to the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.errors import ConfigError, InputError
from components.shards import TokenizedSplit, pad_batch, sorted_batches

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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxClassifier:
    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0):
        from transformers import AutoTokenizer

        if not (model_dir / "model.onnx").is_file():
            raise InputError(f"{model_dir}: no model.onnx; expected a folder written by kubetune export")
        self.dir = model_dir
        self.info = json.loads((model_dir / "kubetune.json").read_text())
        self.labels = json.loads((model_dir / "labels.json").read_text())["labels"]
        self.session = create_session(model_dir / "model.onnx", device, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = int(self.info["max_length"])

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

    def logits_for_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Tokenize with the model's own tokenizer and max_length, batch similar lengths."""
        rows = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        split = TokenizedSplit(np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]), offsets,
                               np.zeros(len(rows), dtype=np.int64))
        return self.logits_for_tokens(split, batch_size)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """The prediction contract shared by batch inference and serving: per text, the top label,
        its probability and every class probability ({label: p}, in the model's label order)."""
        if not texts:
            return []
        probs = softmax(self.logits_for_texts(texts, batch_size).astype(np.float64))
        top = probs.argmax(-1)
        return [{"label": self.labels[k], "score": float(p[k]), "probabilities": dict(zip(self.labels, map(float, p)))}
                for k, p in zip(top, probs)]
