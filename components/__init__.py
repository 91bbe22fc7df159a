"""kubetune: Kubeflow Pipelines steps that take a Hugging Face text model from labelled data to a
served, monitored ONNX model.

This folder (components/) is installed as the package `kubetune` (pyproject's package-dir), and
pipelines/ as `kubetune.pipelines`. The layout:

  kubetune.steps       the pipeline steps, each a `python -m kubetune.steps.<step>` entry (no kfp)
  kubetune.tasks       one module per task family (sequence, token classification, ...): all that differs
  kubetune.storage     the artifact store, file formats, built-in assets, run records, token shards
  kubetune.validation  data checks and splits shared by the tasks
  kubetune.training    model loading, device batches, checkpoints, DDP
  kubetune.onnx        the exported model (OnnxClassifier) and its variants
  kubetune.release     registry, deploy targets (rollout), Kubernetes manifests and API
  kubetune.serving     the KServe model server
  kubetune.core        errors and exit codes, typed config flags, the step context, logging
  kubetune.pipelines   KFP wiring: wrappers, pipelines, parameter table, compile/submit, the CLI
"""

if __name__ != "kubetune":  # e.g. `import components` from the repository root
    raise ImportError(f"{__name__!r} is the source folder of the package 'kubetune': import kubetune instead "
                      "(pip install -e . makes it importable)")
