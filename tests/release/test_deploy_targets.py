"""Deploy targets and registry aliases: KServe through the real kubernetes client against a fake
API server over HTTP (apply, wait, canary, rollback), GitOps against a local bare repository,
compare-and-swap aliases raced by concurrent deploys (local store and S3 on SeaweedFS), rollback.
Then (issue 12) the values that reach git, paths and registry keys, checked at the boundary: a
--gitops-branch that is an option (--upload-pack=...) never reaches git, a symlinked folder in the
watched repository is refused before anything is written through it, ssh needs known_hosts or an
explicit opt-in, `rollback --to` takes only a registry version of this model."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kubetune.errors import ConfigError
from kubetune.pipelines import parameters
from kubetune.pipelines.cli import main
from kubetune.release import registry
from kubetune.release.manifests import ServingConfig
from kubetune.release.rollout import DeployConfig, GitAuth, RolloutFailed, release, roll_back, rollout_gitops
from kubetune.storage.store import Conflict, S3Settings, open_store
from tests.helpers import fake_kube

NAME = "sms-spam"


def publish_version(store, run_id: str, macro_f1: float, tmp_path: Path) -> str:
    """A published registry version as deploy writes it (the model files do not matter here)."""
    version = registry.new_version(run_id)
    folder = tmp_path / f"stage-{run_id}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": 0.98, "macro_f1": macro_f1}, "run_id": run_id,
                                                     "data_fingerprint": f"fp-{run_id}"}))
    assert store.publish_dir(folder, registry.version_prefix(NAME, version))
    return version


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


@pytest.fixture
def kube(tmp_path):
    with fake_kube.FakeKube() as fake:
        fake.config_path = fake.kubeconfig(tmp_path / "kubeconfig")
        yield fake


def kserve(kube, **kw) -> DeployConfig:
    kw = {"kubeconfig": str(kube.config_path), **kw}
    return DeployConfig(target="kserve", poll_seconds=0.02, timeout_seconds=kw.pop("timeout", 5), **kw)


def live_version(kube) -> str:
    return kube.objects[("ml", NAME)]["metadata"]["annotations"]["kubetune.io/model-version"]


# ---- kserve ----------------------------------------------------------------------------------


def test_kserve_apply_wait_then_alias(store, kube, tmp_path):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    result = release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    assert result["rollout"]["url"] == f"http://{NAME}.example.com" and result["rollout"]["generation"] == 1
    obj = kube.objects[("ml", NAME)]
    assert live_version(kube) == v1
    env = obj["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": store.url(registry.version_prefix(NAME, v1))} in env
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    patches = [r for r in kube.requests if r["method"] == "PATCH"]
    assert len(patches) == 1 and patches[0]["content_type"] == "application/apply-patch+yaml"
    assert patches[0]["query"] == {"fieldManager": ["kubetune"], "force": ["true"], "fieldValidation": ["Strict"]}
    alias = registry.read_alias(store, NAME)
    assert alias["version"] == v1 and alias["target"] == "kserve" and alias["data_fingerprint"] == "fp-r1-aaaa"


def test_kserve_failure_restores_previous_spec_and_alias(store, kube, tmp_path):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    kube.controller = lambda obj: fake_kube.failed_load(obj) if obj["metadata"]["generation"] == 2 else fake_kube.ready(obj)
    expected = rf"failed: Ready=False \(RevisionFailed: model failed to load\).*rolled back to the previous spec \(model version {v1}\)"
    with pytest.raises(RolloutFailed, match=expected):
        release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube), "deploy-2")
    assert live_version(kube) == v1  # the previous spec is live again (a 3rd generation, ready)
    assert [r["method"] for r in kube.requests].count("PATCH") == 3
    assert registry.read_alias(store, NAME)["version"] == v1  # the alias never moved


def test_kserve_timeout_counts_only_the_new_generation(store, kube, tmp_path):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    # the old revision stays Ready, but KServe never observes generation 2
    kube.controller = lambda obj: {**fake_kube.ready(obj), "observedGeneration": 1}
    with pytest.raises(RolloutFailed, match=r"not ready after 0s.*rolled back"):
        release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, timeout=0.3), "deploy-2")
    assert live_version(kube) == v1 and registry.read_alias(store, NAME)["version"] == v1


def test_kserve_first_deploy_failure_and_canary(store, kube, tmp_path):
    kserve_default(kube, "Serverless")
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    with pytest.raises(Exception, match="a canary needs a live revision"):
        release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "c")
    kube.controller = fake_kube.failed_load
    with pytest.raises(RolloutFailed, match="there was no previous InferenceService ml/sms-spam to restore"):
        release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    assert registry.read_alias(store, NAME) is None
    kube.controller = fake_kube.ready
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    result = release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "canary-2")
    assert kube.objects[("ml", NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert result["alias"]["version"] == v2 and registry.read_alias(store, NAME, "canary")["version"] == v2
    assert registry.read_alias(store, NAME)["version"] == v1  # a canary is not production until promoted


def test_kserve_errors_name_the_object(store, kube, tmp_path):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    kube.config_path.write_text(kube.config_path.read_text().replace(fake_kube.TOKEN, "wrong"))
    with pytest.raises(Exception, match=r"InferenceService ml/sms-spam: Unauthorized \(HTTP 401\)"):
        release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    with pytest.raises(Exception, match="no Kubernetes access"):
        release(store, NAME, v1, ServingConfig(), kserve(kube, kubeconfig=str(tmp_path / "missing")), "x")


# ---- gitops ----------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def bare_repo(tmp_path) -> Path:
    """A bare repository with one unrelated commit on main, as an Argo CD source repo would have."""
    bare = tmp_path / "deploy.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    seed = tmp_path / "seed"
    subprocess.run(["git", "clone", "-q", str(bare), str(seed)], check=True, capture_output=True)
    (seed / "README.md").write_text("deployments\n")
    git(seed, "add", "README.md")
    git(seed, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "init")
    git(seed, "push", "-q", "origin", "HEAD:refs/heads/main")
    return bare


def test_gitops_commits_exactly_the_manifest(store, tmp_path, bare_repo):
    v1 = publish_version(store, "r1-aaaa", 0.9512, tmp_path)
    cfg = DeployConfig(target="gitops", gitops_repo=str(bare_repo), gitops_branch="main", gitops_path="apps/kubetune")
    auth = GitAuth(username="bot", token="s3cr3t-token", author_name="kubetune-bot", author_email="bot@example.com")
    result = release(store, NAME, v1, ServingConfig(namespace="ml"), cfg, "deploy-1", auth)
    commit = result["rollout"]["commit"]
    assert git(bare_repo, "rev-parse", "main").strip() == commit and result["rollout"]["changed"]
    assert git(bare_repo, "show", "--name-only", "--format=", commit).split() == ["apps/kubetune/sms-spam.yaml"]
    message = git(bare_repo, "log", "-1", "--format=%B", commit)
    assert f"Deploy {NAME} {v1}" in message and "macro_f1 0.9512" in message and "accuracy 0.9800" in message
    assert git(bare_repo, "log", "-1", "--format=%an <%ae>", commit).strip() == "kubetune-bot <bot@example.com>"
    manifest = yaml.safe_load(git(bare_repo, "show", f"{commit}:apps/kubetune/sms-spam.yaml"))
    assert manifest == result["manifest"] and manifest["metadata"]["annotations"]["kubetune.io/model-version"] == v1
    assert {"name": "STORAGE_URI", "value": store.url(registry.version_prefix(NAME, v1))} in \
        manifest["spec"]["predictor"]["containers"][0]["env"]
    assert registry.read_alias(store, NAME)["version"] == v1
    assert "s3cr3t-token" not in json.dumps(result) + repr(auth)

    # the same version again: the desired state is already committed, no empty commit
    again = release(store, NAME, v1, ServingConfig(namespace="ml"), cfg, "deploy-2", auth)
    assert not again["rollout"]["changed"] and git(bare_repo, "rev-list", "--count", "main").strip() == "2"
    # a rollback is a new commit pinning the previous version
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    release(store, NAME, v2, ServingConfig(namespace="ml"), cfg, "deploy-3", auth)
    back = roll_back(store, NAME, ServingConfig(namespace="ml"), cfg, "rb", auth)
    assert back["alias"]["version"] == v1 and back["alias"]["rolled_back_from"] == v2
    shown = yaml.safe_load(git(bare_repo, "show", "main:apps/kubetune/sms-spam.yaml"))
    assert shown["metadata"]["annotations"]["kubetune.io/model-version"] == v1


def test_gitops_errors_never_show_credentials(store, tmp_path):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    cfg = DeployConfig(target="gitops", gitops_repo="http://bot:hunter2@127.0.0.1:9/deploy.git")
    with pytest.raises(RolloutFailed) as exc:
        release(store, NAME, v1, ServingConfig(), cfg, "d", GitAuth(token="hunter2"))
    assert "hunter2" not in str(exc.value) and "127.0.0.1:9" in str(exc.value)
    assert registry.read_alias(store, NAME) is None
    with pytest.raises(Exception, match="needs gitops_repo"):
        release(store, NAME, v1, ServingConfig(), DeployConfig(target="gitops"), "d")


# ---- aliases: compare-and-swap, races, rollback ------------------------------------------------


def test_write_if_is_compare_and_swap(store, s3_bucket):
    for st in (store, open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))):
        assert st.read_versioned("a.json") == (None, None)
        st.write_if("a.json", b"1", None)
        with pytest.raises(Conflict):
            st.write_if("a.json", b"2", None)  # it exists now
        data, token = st.read_versioned("a.json")
        st.write_if("a.json", b"3", token)
        with pytest.raises(Conflict):
            st.write_if("a.json", b"4", token)  # stale token
        assert st.read_versioned("a.json")[0] == b"3"


def race(stores, versions) -> list:
    """Both deploys read the alias before either writes (a barrier on the first read), the
    interleaving that loses an update without compare-and-swap."""
    barrier = threading.Barrier(len(stores), timeout=10)
    for st in stores:
        original, first = st.read_versioned, [True]

        def gated(key, original=original, first=first):
            result = original(key)
            if first[0]:
                first[0] = False
                barrier.wait()
            return result

        st.read_versioned = gated
    errors = []

    def go(st, version):
        try:
            registry.set_alias(st, NAME, registry.PRODUCTION, version, f"run-{version}")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=go, args=(st, v)) for st, v in zip(stores, versions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_racing_deploys_never_lose_an_update(backend, tmp_path, request):
    if backend == "local":
        make = lambda: open_store(str(tmp_path / "store"))  # noqa: E731
    else:
        bucket = request.getfixturevalue("s3_bucket")
        make = lambda: open_store(f"s3://{bucket}/kt", S3Settings.from_env(os.environ))  # noqa: E731
    seed = make()
    v0, v1, v2 = (publish_version(seed, f"{backend}-r{i}", 0.9, tmp_path) for i in range(3))
    registry.set_alias(seed, NAME, registry.PRODUCTION, v0, "r0")
    assert race([make(), make()], [v1, v2]) == []
    prod = registry.read_alias(seed, NAME)
    assert prod["version"] in (v1, v2)
    other = v2 if prod["version"] == v1 else v1
    assert prod["previous"] == other and prod["history"] == [other, v0]  # both landed, one after the other
    assert registry.read_alias(seed, NAME, registry.PREVIOUS)["version"] == other


def test_rollback_cli_walks_back_through_history(store, tmp_path, capsys):
    v1, v2, v3 = (publish_version(store, f"cccc-r{i}", 0.9, tmp_path) for i in range(1, 4))
    for v in (v1, v2, v3):
        registry.set_alias(store, NAME, registry.PRODUCTION, v, "r")
    assert main(["rollback", NAME, "--store", store.uri]) == 0
    assert f"{v3} -> {v2} (previous now {v1})" in capsys.readouterr().out
    assert main(["rollback", NAME, "--store", store.uri]) == 0
    assert registry.read_alias(store, NAME)["version"] == v1
    assert main(["rollback", NAME, "--store", store.uri]) == 2
    assert "has no previous version to roll back to" in capsys.readouterr().err
    assert main(["models", NAME, "--store", store.uri]) == 0
    assert f"{v1}  production" in capsys.readouterr().out
    assert main(["models", "nosuchmodel", "--store", store.uri]) == 2  # not silence and exit 0: what is there
    assert capsys.readouterr().err.strip().endswith(f"no model 'nosuchmodel' in {store.uri}: the models there are {NAME}")
    assert main(["deploy", NAME, "--version", v3, "--store", store.uri]) == 0  # registry target: promote a version
    alias = registry.read_alias(store, NAME)
    assert alias["version"] == v3 and alias["previous"] == v1
    with pytest.raises(Exception, match="derived from production"):
        registry.set_alias(store, NAME, registry.PREVIOUS, v1, "r")


def test_unreachable_api_server_is_a_clear_error(store, tmp_path):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    with fake_kube.FakeKube() as fake:
        config = fake.kubeconfig(tmp_path / "kubeconfig")
    # the server is gone now; the client retries a few times, then gives up
    with pytest.raises(Exception, match="get InferenceService ml/sms-spam: the Kubernetes API is unreachable"):
        release(store, NAME, v1, ServingConfig(namespace="ml"), DeployConfig(target="kserve", kubeconfig=str(config)), "d")
    assert registry.read_alias(store, NAME) is None


# ---- freshness: skip retraining on unchanged data ------------------------------------------------


def test_freshness_skips_unchanged_data_unless_forced(store, tmp_path):
    from kubetune.steps.freshness import data_fingerprint, decide

    meta = {"train": "a", "eval": "b", "test": "c"}  # the dataset's fingerprints per split
    fp = data_fingerprint(meta)
    assert decide(store, NAME, meta, force=False)["train"] is True  # no production model yet
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    registry.set_alias(store, NAME, registry.PRODUCTION, v1, "r1", {"data_fingerprint": fp})
    skip = decide(store, NAME, meta, force=False)
    assert skip["train"] is False and skip["production_version"] == v1 and "unchanged since production" in skip["reason"]
    assert decide(store, NAME, meta, force=True)["train"] is True
    changed = {**meta, "test": "d"}
    fresh = decide(store, NAME, changed, force=False)
    assert fresh["train"] is True and fresh["reason"] == "the data changed since the production model"


def test_cli_deploy_and_rollback_on_kserve(store, kube, tmp_path, capsys):
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    target = ["--store", store.uri, "--target", "kserve", "--kubeconfig", str(kube.config_path), "--namespace", "ml",
              "--poll-seconds", "0.02", "--image", "reg.example/kubetune:2.0"]
    for v in (v1, v2):
        assert main(["deploy", NAME, "--version", v, *target]) == 0
    assert live_version(kube) == v2
    assert kube.objects[("ml", NAME)]["spec"]["predictor"]["containers"][0]["image"] == "reg.example/kubetune:2.0"
    capsys.readouterr()
    assert main(["rollback", NAME, *target, "--canary-traffic-percent", "5"]) == 2
    assert "a rollback sends all traffic to the previous version" in capsys.readouterr().err
    assert main(["rollback", NAME, *target]) == 0
    assert live_version(kube) == v1 and registry.read_alias(store, NAME)["version"] == v1
    assert f"{v2} -> {v1}" in capsys.readouterr().out


# ---- issue 12: values reaching git, paths and registry keys ----------------------------------------

INJECTIONS = ["--upload-pack=touch {pwned}; git-upload-pack", "-c", "main;touch {pwned}", "..", "a..b", "main.lock", "ma in", ""]


@pytest.mark.parametrize("branch", INJECTIONS)
def test_gitops_branch_that_is_an_option_or_not_a_branch_never_reaches_git(store, tmp_path, bare_repo, branch):
    pwned = tmp_path / "PWNED"
    branch = branch.format(pwned=pwned)
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    cfg = DeployConfig(target="gitops", gitops_repo=str(bare_repo), gitops_branch=branch)
    with pytest.raises(ConfigError, match="gitops_branch"):
        release(store, NAME, v1, ServingConfig(), cfg, "d", GitAuth())
    with pytest.raises(ConfigError, match="gitops_branch"):  # the rollout itself checks too (a caller may skip check())
        rollout_gitops({"metadata": {"name": NAME}}, cfg, GitAuth(), "m")
    with pytest.raises(ConfigError, match="gitops_branch"):  # and the pipeline's parameter check, before any run
        parameters.check({"deploy_target": "gitops", "gitops_repo": str(bare_repo), "gitops_branch": branch})
    assert not pwned.exists()
    assert registry.read_alias(store, NAME) is None


def test_gitops_repo_that_is_an_option_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="gitops_repo"):
        DeployConfig(target="gitops", gitops_repo=f"--upload-pack=touch {tmp_path}/PWNED").check()
    DeployConfig(target="gitops", gitops_repo="git@github.com:org/deploy.git", gitops_branch="release/v1.2").check()


def test_gitops_refuses_a_symlinked_folder_in_the_watched_repo(store, tmp_path, bare_repo):
    """deploy -> a folder outside the clone: kubetune must not write there (nor commit)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    seed = tmp_path / "seed"
    os.symlink(outside, seed / "deploy")
    git(seed, "add", "deploy")
    git(seed, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "link")
    git(seed, "push", "-q", "origin", "main")
    head = git(bare_repo, "rev-parse", "main")
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    cfg = DeployConfig(target="gitops", gitops_repo=str(bare_repo), gitops_branch="main", gitops_path="deploy/inferenceservices")
    with pytest.raises(RolloutFailed, match="deploy is a symbolic link"):
        release(store, NAME, v1, ServingConfig(), cfg, "d", GitAuth())
    assert list(outside.iterdir()) == []
    assert git(bare_repo, "rev-parse", "main") == head and registry.read_alias(store, NAME) is None


def test_ssh_without_known_hosts_is_refused_unless_opted_in(tmp_path):
    key = tmp_path / "id"
    with pytest.raises(ConfigError, match="KUBETUNE_GIT_KNOWN_HOSTS is not"):
        GitAuth.from_env({"KUBETUNE_GIT_SSH_KEY": str(key)}).env(tmp_path)
    opted = GitAuth.from_env({"KUBETUNE_GIT_SSH_KEY": str(key), "KUBETUNE_GIT_SSH_ACCEPT_NEW_HOST_KEY": "1"}).env(tmp_path)
    assert "StrictHostKeyChecking=accept-new" in opted["GIT_SSH_COMMAND"]
    pinned = GitAuth.from_env({"KUBETUNE_GIT_SSH_KEY": str(key), "KUBETUNE_GIT_KNOWN_HOSTS": str(tmp_path / "kh")}).env(tmp_path)
    assert "StrictHostKeyChecking=yes" in pinned["GIT_SSH_COMMAND"] and "UserKnownHostsFile=" in pinned["GIT_SSH_COMMAND"]
    assert pinned["GIT_ALLOW_PROTOCOL"] == "file:git:http:https:ssh"  # no ext:: transport (it runs commands)


def test_rollback_to_takes_only_a_registry_version(store, tmp_path, capsys):
    """--to ../../<other store>/models/x/v1 used to exit 0 with production outside the model."""
    other = open_store(str(tmp_path / "other"))
    (tmp_path / "o").mkdir()
    foreign = publish_version(other, "ffff-r9", 0.5, tmp_path / "o")
    v1, v2 = (publish_version(store, f"cccc-r{i}", 0.9, tmp_path) for i in (1, 2))
    for v in (v1, v2):
        registry.set_alias(store, NAME, registry.PRODUCTION, v, "r")
    rel = os.path.relpath(other.root / registry.version_prefix(NAME, foreign), store.root / "models" / NAME)
    assert (store.root / "models" / NAME / rel / "_MANIFEST.json").is_file()  # the path does lead to a sealed version
    for to in (rel, "../" + v1, "/abs/path", "production"):
        assert main(["rollback", NAME, "--store", store.uri, "--to", to]) == 2
        err = capsys.readouterr().err
        assert "not a registry version" in err and err.count("\n") == 1, err
    assert registry.read_alias(store, NAME)["version"] == v2
    with pytest.raises(Exception, match="not a registry version"):
        registry.rollback(store, NAME, to=rel)
    with pytest.raises(Exception, match="neither a registry version"):
        registry.resolve(store, f"models/{NAME}/{rel.replace('/', '%')}")
    assert main(["rollback", NAME, "--store", store.uri, "--to", v1]) == 0
    assert registry.read_alias(store, NAME)["version"] == v1


def test_an_alias_document_pointing_outside_is_refused(store, tmp_path):
    v1 = publish_version(store, "cccc-r1", 0.9, tmp_path)
    registry.set_alias(store, NAME, registry.PRODUCTION, v1, "r")
    doc = registry.read_alias(store, NAME)
    store.write_json(registry.alias_key(NAME, "production"), {**doc, "version": "../../elsewhere/v1"})
    with pytest.raises(Exception, match="points at '../../elsewhere/v1': not a registry version"):
        registry.resolve(store, NAME)


def test_rejected_names_and_a_file_as_store_create_nothing(tmp_path, capsys):
    missing = tmp_path / "never-created"
    for argv in (["models", "Bad_Name", "--store", str(missing)], ["rollback", "x_y", "--store", str(missing)],
                 ["deploy", "UPPER", "--store", str(missing)], ["models", NAME, "--store", str(missing)]):
        code = main(argv)
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert not missing.exists(), argv
    a_file = tmp_path / "store.txt"
    a_file.write_text("not a store")
    assert main(["models", NAME, "--store", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.strip().count("\n") == 0
    assert main(["models", NAME, "--store", str(a_file / "sub")]) == 2
    assert "Traceback" not in capsys.readouterr().err


# ---- a canary in each KServe deployment mode (issue 24) ----------------------------------------------


def kserve_default(kube, mode: str) -> None:
    """KServe's controller default, as its inferenceservice-config ConfigMap holds it."""
    kube.config_maps[("kserve", "inferenceservice-config")] = {"deploy": json.dumps({"defaultDeploymentMode": mode})}


@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
def test_a_canary_splits_traffic_in_either_mode(store, kube, tmp_path, mode):
    """10% means 10% in both modes: Knative's canaryTrafficPercent in Serverless mode, a spec.canary
    entry beside the live predictor in Standard (RawDeployment) mode, whose controller ignores
    canaryTrafficPercent (the code before this sent the new version all of the traffic there)."""
    kserve_default(kube, mode)
    if mode == "RawDeployment":
        kube.controller = fake_kube.standard_ready
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    assert kube.traffic("ml", NAME) == {v1: 100}
    result = release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "canary-2")
    assert kube.traffic("ml", NAME) == {v1: 90, v2: 10}
    assert result["rollout"]["mode"] == ("Serverless" if mode == "Serverless" else "Standard")
    assert registry.read_alias(store, NAME, "canary")["version"] == v2 and registry.read_alias(store, NAME)["version"] == v1
    spec = kube.objects[("ml", NAME)]["spec"]
    if mode == "RawDeployment":  # the live predictor untouched; the canary without autoscaling fields (KServe's webhook refuses them)
        (entry,) = spec["canary"]
        assert "canaryTrafficPercent" not in spec["predictor"] and fake_kube.version_of(spec["predictor"]) == v1
        assert entry["trafficPercent"] == 10 and entry["predictor"]["name"] == v2 and "minReplicas" not in entry["predictor"]
    # a full deploy afterwards replaces the canary: all traffic to the new version, in either mode
    release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube), "deploy-2")
    assert kube.traffic("ml", NAME) == {v2: 100} and "canary" not in kube.objects[("ml", NAME)]["spec"]


def test_the_mode_comes_from_the_service_then_kserve_then_the_option(store, kube, tmp_path):
    """Without anything saying the mode, a canary is refused before anything is applied (exit 2,
    naming the fix); the service's own annotation wins over KServe's default, which wins over --kserve-mode."""
    from kubetune.release.rollout import deployment_mode

    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    before = json.dumps(kube.objects[("ml", NAME)])
    kube.forbidden_config_maps = True  # the deployer may not read KServe's ConfigMap
    with pytest.raises(ConfigError, match="cannot tell the KServe deployment mode .* set --kserve-mode Serverless or Standard") as e:
        release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "canary-2")
    assert e.value.exit_code == 2 and json.dumps(kube.objects[("ml", NAME)]) == before
    assert registry.read_alias(store, NAME, "canary") is None

    from kubetune.release import kube as kube_api

    client = kube_api.connect(str(kube.config_path))
    live = kube.objects[("ml", NAME)]
    assert deployment_mode(client, live, kserve(kube, kserve_mode="Standard")) == ("Standard", "--kserve-mode")
    kube.forbidden_config_maps = False
    kserve_default(kube, "Serverless")
    assert deployment_mode(client, live, kserve(kube, kserve_mode="Standard")) == ("Serverless", "ConfigMap kserve/inferenceservice-config")
    annotated = {**live, "metadata": {**live["metadata"], "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"}}}
    assert deployment_mode(client, annotated, kserve(kube))[0] == "Standard"
    modelmesh = {**live, "metadata": {**live["metadata"], "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"}}}
    kube.objects[("ml", NAME)] = modelmesh
    with pytest.raises(ConfigError, match="ModelMesh mode .* cannot split traffic"):
        release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "canary-2")


def test_a_standard_canary_on_kserve_before_0_20_is_refused(store, kube, tmp_path):
    """KServe before 0.20 has no spec.canary: applied with strict field validation the API server
    refuses it (without it, the field would be dropped silently and nothing split); exit 2, nothing changed."""
    kserve_default(kube, "RawDeployment")
    kube.controller = fake_kube.standard_ready
    kube.unknown_fields = ("canary",)
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")
    with pytest.raises(ConfigError, match=r"spec.canary: field not declared in schema.*KServe before 0\.20") as e:
        release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "canary-2")
    assert e.value.exit_code == 2 and kube.traffic("ml", NAME) == {v1: 100} and "canary" not in kube.objects[("ml", NAME)]["spec"]


def test_a_standard_canary_that_fails_to_load_is_removed(store, kube, tmp_path):
    """The canary's own status says it failed to load: the live spec is applied again (the canary
    entry goes), production and the canary alias stay where they were."""
    kserve_default(kube, "RawDeployment")
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    kube.controller = fake_kube.standard_ready
    release(store, NAME, v1, ServingConfig(namespace="ml"), kserve(kube), "deploy-1")

    def canary_fails(obj):
        s = fake_kube.standard_ready(obj)
        for c in s["canaryStatuses"]:
            c.update(ready=False, modelStatus={"transitionStatus": "BlockedByFailedLoad"})
        s["conditions"] = [c for c in s["conditions"] if c["type"] != "CanaryReady"] + (
            [{"type": "CanaryReady", "status": "False", "reason": "CanaryNotReady"}] if s["canaryStatuses"] else [])
        return s

    kube.controller = canary_fails
    with pytest.raises(RolloutFailed, match="rolled back to the previous spec"):
        release(store, NAME, v2, ServingConfig(namespace="ml"), kserve(kube, canary_traffic_percent=10), "canary-2")
    assert "canary" not in kube.objects[("ml", NAME)]["spec"] and kube.traffic("ml", NAME) == {v1: 100}
    assert registry.read_alias(store, NAME, "canary") is None and registry.read_alias(store, NAME)["version"] == v1


@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
def test_promote_and_roll_back_a_canary_in_either_mode(store, kube, tmp_path, mode, capsys):
    """`kubetune deploy --promote`: the canary takes all traffic (Standard: the stable predictor is
    retargeted to the canary's name, the entry goes), production moves to it, the canary alias
    goes. `kubetune rollback --canary`: production takes all traffic back, production stays."""
    kserve_default(kube, mode)
    if mode == "RawDeployment":
        kube.controller = fake_kube.standard_ready
    target = ["--target", "kserve", "--kubeconfig", str(kube.config_path), "--poll-seconds", "0.02", "--timeout-seconds", "5",
              "--namespace", "ml", "--store", str(tmp_path / "store")]
    v1 = publish_version(store, "r1-aaaa", 0.95, tmp_path)
    v2 = publish_version(store, "r2-bbbb", 0.96, tmp_path)
    v3 = publish_version(store, "r3-cccc", 0.97, tmp_path)
    assert main(["deploy", NAME, "--version", v1, *target]) == 0
    assert main(["deploy", NAME, "--version", v2, "--canary-traffic-percent", "20", *target]) == 0
    assert kube.traffic("ml", NAME) == {v1: 80, v2: 20}
    assert main(["deploy", NAME, "--promote", *target]) == 0
    assert kube.traffic("ml", NAME) == {v2: 100} and registry.read_alias(store, NAME)["version"] == v2
    assert registry.read_alias(store, NAME, "canary") is None and registry.read_alias(store, NAME)["previous"] == v1
    spec = kube.objects[("ml", NAME)]["spec"]
    assert "canary" not in spec and "canaryTrafficPercent" not in spec["predictor"]
    if mode == "RawDeployment":  # retargeted: the canary's Deployment is the stable one now, no restart
        assert spec["predictor"]["name"] == v2
    # another canary, rolled back: production (v2) takes all traffic again, still under its name
    assert main(["deploy", NAME, "--version", v3, "--canary-traffic-percent", "10", *target]) == 0
    assert kube.traffic("ml", NAME) == {v2: 90, v3: 10}
    capsys.readouterr()
    assert main(["rollback", NAME, "--canary", *target]) == 0
    assert f"{NAME}/canary {v3} rolled back; production {v2} takes all traffic" in capsys.readouterr().out
    assert kube.traffic("ml", NAME) == {v2: 100} and "canary" not in kube.objects[("ml", NAME)]["spec"]
    assert registry.read_alias(store, NAME)["version"] == v2 and registry.read_alias(store, NAME, "canary") is None
    if mode == "RawDeployment":
        assert kube.objects[("ml", NAME)]["spec"]["predictor"]["name"] == v2
    assert main(["deploy", NAME, "--promote", *target]) == 2  # nothing left to promote
    assert "has no canary" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["Serverless", "Standard"])
def test_a_gitops_canary_commits_the_form_of_the_named_mode(store, tmp_path, bare_repo, mode):
    """GitOps cannot ask the cluster: the user names the mode, the commit holds that mode's canary
    (Standard: the committed stable spec kept, the new version as a spec.canary entry), promotion and
    rollback commit the full spec (Standard: under the canary's name); each file matches the KServe CRD."""
    from kubetune.release.rollout import abort_canary, promote
    from tests.helpers import schemas

    v1, v2, v3 = (publish_version(store, f"r{i}-{tail}", 0.95, tmp_path) for i, tail in ((1, "aaaa"), (2, "bbbb"), (3, "cccc")))
    cfg = DeployConfig(target="gitops", gitops_repo=str(bare_repo), gitops_branch="main", gitops_path="apps")
    with pytest.raises(ConfigError, match="name the KServe mode"):
        release(store, NAME, v2, ServingConfig(namespace="ml"), replace(cfg, canary_traffic_percent=10), "c", GitAuth())

    def committed() -> dict:
        doc = yaml.safe_load(git(bare_repo, "show", "main:apps/sms-spam.yaml"))
        schemas.validate(doc)
        return doc

    release(store, NAME, v1, ServingConfig(namespace="ml"), cfg, "d1", GitAuth())
    canary = replace(cfg, canary_traffic_percent=10, kserve_mode=mode)
    release(store, NAME, v2, ServingConfig(namespace="ml"), canary, "c2", GitAuth())
    doc = committed()
    shares = fake_kube.traffic({**doc, "status": {"deploymentMode": "RawDeployment"} if mode == "Standard" else {}}, v1)
    assert shares == {v1: 90, v2: 10} and registry.read_alias(store, NAME, "canary")["version"] == v2
    promote(store, NAME, ServingConfig(namespace="ml"), cfg, "p", GitAuth())
    doc = committed()
    assert fake_kube.version_of(doc["spec"]["predictor"]) == v2 and "canary" not in doc["spec"]
    assert doc["spec"]["predictor"].get("name") == (v2 if mode == "Standard" else None)
    assert registry.read_alias(store, NAME)["version"] == v2 and registry.read_alias(store, NAME, "canary") is None
    release(store, NAME, v3, ServingConfig(namespace="ml"), canary, "c3", GitAuth())
    abort_canary(store, NAME, ServingConfig(namespace="ml"), cfg, "a", GitAuth())
    doc = committed()
    assert fake_kube.version_of(doc["spec"]["predictor"]) == v2 and "canary" not in doc["spec"]
    assert "canaryTrafficPercent" not in doc["spec"]["predictor"] and registry.read_alias(store, NAME)["version"] == v2
