"""KFP wiring (installed as `kubetune.pipelines`): typed component wrappers that import and call a
step, the training and batch-inference pipelines, the parameter table, compile/submit/schedule and
the `kubetune` CLI."""

if __name__ != "kubetune.pipelines":  # e.g. `import pipelines` from the repository root
    raise ImportError(f"{__name__!r} is the source folder of 'kubetune.pipelines': import kubetune.pipelines instead")
