"""Deploy targets: what "deploy" does after a version is published in the registry. One code path,
`release` (and `roll_back`, a release of the previous version), for the pipeline's deploy step,
`kubetune deploy` and `kubetune rollback`.

  registry  move the `production` alias (nothing else; serving follows the alias or GitOps)
  kserve    server-side apply the InferenceService through the Kubernetes API, optionally as a
            canary, wait for Ready; on failure or timeout re-apply the spec that was live before,
            and leave the alias where it was. A canary takes the form of the service's KServe
            deployment mode: canaryTrafficPercent in Serverless (Knative) mode; a spec.canary entry
            beside the live predictor in Standard (RawDeployment) mode, KServe 0.20+, where
            canaryTrafficPercent is ignored (the new version would take all traffic). The mode is the
            service's serving.kserve.io/deploymentMode annotation (or status), else the default in
            KServe's inferenceservice-config ConfigMap, else --kserve-mode; when none says, or the
            mode cannot split traffic, the canary is refused before anything is applied
  gitops    commit the rendered InferenceService (pinned to the version's URI) to a Git repository
            path/branch that an Argo CD Application watches (k8s/argocd), and push

    kubetune deploy sms-spam --target kserve --canary-traffic-percent 10
    kubetune deploy sms-spam --target gitops --gitops-repo https://git.example.com/ml/deploy.git

Git credentials come from the environment (a Secret on a cluster), never from the command line,
and are never logged: KUBETUNE_GIT_USERNAME + KUBETUNE_GIT_TOKEN for https (given to git through
GIT_ASKPASS, so the token is in no argv and no URL), or KUBETUNE_GIT_SSH_KEY (+ optional
KUBETUNE_GIT_KNOWN_HOSTS, required: without it ssh refuses, unless KUBETUNE_GIT_SSH_ACCEPT_NEW_HOST_KEY=1
opts in to trusting the first key seen) for ssh. The commit author is KUBETUNE_GIT_AUTHOR_NAME/EMAIL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from kubetune import tasks
from kubetune.core.config import opt, param
from kubetune.core.progress import log
from kubetune.errors import ConfigError, InputError, KubetuneError
from kubetune.release import kube, registry
from kubetune.release.manifests import ServingConfig, inference_service, to_yaml
from kubetune.storage.store import Store

TARGETS = ("registry", "kserve", "gitops")
KSERVE_MODES = ("Serverless", "Standard")  # the modes a canary can split traffic in
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
_MODE_NAMES = {"serverless": "Serverless", "rawdeployment": "Standard", "standard": "Standard", "modelmesh": "ModelMesh"}
ISVC_CONFIG = "inferenceservice-config"  # KServe's controller settings; its "deploy" key holds defaultDeploymentMode
# a Standard-mode canary's replicas follow its traffic share: KServe's webhook refuses autoscaling fields on it
_AUTOSCALING = ("minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget", "autoScaling")
STEP = "deploy"
MANIFEST_FILE = "inferenceservice.yaml"  # the rendered InferenceService, in each registry version


class RolloutFailed(KubetuneError):
    """The new version did not become live; what was live before was restored (the message says)."""


@dataclass(frozen=True)
class DeployConfig:
    target: str = param("registry", "registry (move the production alias), kserve (apply, wait for Ready, else roll back) or "
                        "gitops (commit for Argo CD).", name="deploy_target", choices=TARGETS)
    canary_traffic_percent: int = param(0, "kserve and gitops: share of traffic (1-99) for the new model as a canary, in the form of "
                                           "the KServe mode (kserve_mode); 0 = all traffic.")
    kserve_mode: str = param("", "kserve and gitops: the KServe deployment mode, for the kserve target when the cluster does not "
                             "say (the InferenceService's serving.kserve.io/deploymentMode annotation, else KServe's "
                             "inferenceservice-config default), and for a gitops canary always: Serverless (a canary is "
                             "canaryTrafficPercent) or Standard (RawDeployment; a canary is spec.canary, KServe 0.20+).",
                             choices=("", *KSERVE_MODES))
    kserve_namespace: str = opt("kserve", "kserve only: the namespace of KServe's controller and its inferenceservice-config ConfigMap.")
    timeout_seconds: int = opt(600, "kserve only: seconds to wait for the InferenceService to be Ready before rolling back.")
    poll_seconds: float = opt(5.0, "kserve only: seconds between readiness checks.")
    kubeconfig: str = opt("", "kserve only, outside a cluster: kubeconfig file; empty: in-cluster config in a pod, else "
                              "$KUBECONFIG or ~/.kube/config.")
    context: str = opt("", "kserve only: kubeconfig context; empty: its current context.")
    # gitops: clone URL (https://, ssh://, git@host:path or a local path)
    gitops_repo: str = param("", "gitops only: Git URL the Argo CD Application watches (credentials from the kubetune-git Secret).")
    gitops_branch: str = param("main", "gitops only: branch to commit to.")
    gitops_path: str = param("deploy/inferenceservices", "gitops only: folder in the repository; the manifest is <model_name>.yaml.")

    def check(self) -> None:
        problems = []
        if self.target not in TARGETS:
            problems.append(f"deploy target {self.target!r}: use one of {', '.join(TARGETS)}")
        if not 0 <= self.canary_traffic_percent <= 99:
            problems.append(f"canary_traffic_percent={self.canary_traffic_percent}: use 0 (no canary) to 99")
        if self.canary_traffic_percent and self.target not in ("kserve", "gitops"):
            problems.append(f"canary_traffic_percent={self.canary_traffic_percent} needs deploy target kserve or gitops (got {self.target})")
        if self.canary_traffic_percent and self.target == "gitops" and not self.kserve_mode:
            problems.append(f"canary_traffic_percent={self.canary_traffic_percent} with deploy target gitops: name the KServe mode the "
                            "cluster serves it in (kserve_mode Serverless or Standard): the commit must hold that mode's canary form")
        if self.kserve_mode not in ("", *KSERVE_MODES):
            problems.append(f"kserve_mode={self.kserve_mode!r}: use {' or '.join(KSERVE_MODES)} (or leave it empty: the cluster says)")
        if self.kserve_mode and self.target not in ("kserve", "gitops"):
            problems.append(f"kserve_mode={self.kserve_mode} needs deploy target kserve or gitops (got {self.target})")
        if self.target == "kserve" and self.timeout_seconds <= 0:
            problems.append(f"timeout_seconds={self.timeout_seconds}: must be positive")
        if self.target == "gitops" and not self.gitops_repo:
            problems.append("deploy target gitops needs gitops_repo (the Git URL the Argo CD Application watches)")
        if self.target == "gitops" and (self.gitops_path.startswith("/") or ".." in Path(self.gitops_path).parts):
            problems.append(f"gitops_path {self.gitops_path!r}: use a relative folder inside the repository")
        problems += check_git_values(self.gitops_repo, self.gitops_branch)  # whatever the target: both reach git's argv
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def alias(self) -> str:
        """A canary does not become production: it gets the `canary` alias until promoted."""
        return "canary" if self.canary_traffic_percent else "production"


_SAFE_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def check_git_values(repo: str, branch: str) -> list[str]:
    """The branch and URL reach git's argv: a value starting with '-' would be read as an option
    (--upload-pack=... runs a command). The branch must also be a valid branch name for git itself."""
    problems = []
    if repo.startswith("-") or any(c in repo for c in "\n\r\0"):
        problems.append(f"gitops_repo {repo!r}: not a Git URL or path")
    if not _SAFE_BRANCH.match(branch) or not _git_accepts_branch(branch):
        problems.append(f"gitops_branch {branch!r}: not a valid branch name (letters, digits, '.', '_', '-', '/'; "
                        "not starting with '-'; see git check-ref-format)")
    return problems


def _git_accepts_branch(branch: str) -> bool:
    try:
        return subprocess.run(["git", "check-ref-format", "--branch", branch], capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:  # no git here (a compile-only machine): the pattern above must do
        return ".." not in branch and not branch.endswith((".lock", "/", ".")) and "//" not in branch


def refuse_symlinks(root: Path, rel: str) -> None:
    """The file kubetune writes in the clone must not lead outside it: a symlinked folder in the
    watched repository would make the write land anywhere on this machine."""
    path = root
    for part in Path(rel).parts:
        path = path / part
        if path.is_symlink():
            raise RolloutFailed(f"{path.relative_to(root)} is a symbolic link in the GitOps repository; "
                                "kubetune writes only to real folders there (replace the link with a folder)")


# ---------------------------------------------------------------------------------------------
# kserve


def isvc_verdict(obj: dict, generation: int | None, canary: str = "") -> bool | None:
    """True when the InferenceService is Ready for our generation (and, for a Standard-mode
    `canary`, CanaryReady); None when KServe reports a failure that waiting will not fix (the model
    failed to load, the spec is invalid)."""
    status = obj.get("status") or {}
    mine = [c for c in status.get("canaryStatuses") or [] if c.get("name") == canary] if canary else []
    for s in [status, *mine]:
        if ((s.get("modelStatus") or {}).get("transitionStatus")) in ("BlockedByFailedLoad", "InvalidSpec"):
            return None
    if canary and kube.conditions(obj).get("CanaryReady", {}).get("status") != "True":
        return False
    return kube.is_ready(obj, generation)


def deployment_mode(client: kube.Kube, live: dict, cfg: DeployConfig) -> tuple[str, str]:
    """(mode, what said so) of a live InferenceService: its annotation or status, else KServe's
    default (the inferenceservice-config ConfigMap, if this ServiceAccount may read it), else
    --kserve-mode; ("", ...) when nothing says."""
    said = ((live.get("metadata") or {}).get("annotations") or {}).get(MODE_ANNOTATION) or (live.get("status") or {}).get("deploymentMode")
    if said:
        return _MODE_NAMES.get(said.lower(), said), f"the InferenceService's {MODE_ANNOTATION}"
    data = client.config_map(cfg.kserve_namespace, ISVC_CONFIG) or {}
    try:
        default = json.loads(data.get("deploy") or "{}").get("defaultDeploymentMode")
    except ValueError:
        default = None
    if default:
        return _MODE_NAMES.get(default.lower(), default), f"ConfigMap {cfg.kserve_namespace}/{ISVC_CONFIG}"
    return cfg.kserve_mode, "--kserve-mode"


def canary_name(version: str) -> str:
    """The Standard-mode canary predictor's name (KServe names its Deployment <service>-<name>-predictor)."""
    name = re.sub(r"[^a-z0-9-]+", "-", version.lower()).strip("-")[:30].rstrip("-")
    return name if name[:1].isalpha() else f"v{name}"[:30]


def keep_predictor_name(manifest: dict, live: dict) -> dict:
    """A full rollout of the version the live service already runs under a predictor name (a
    Standard-mode canary being promoted, or a promoted one): keep that name, so KServe retargets the
    stable predictor to the running Deployment instead of starting another one."""
    version = manifest["metadata"]["annotations"]["kubetune.io/model-version"]
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    spec = live.get("spec") or {}
    if annotations.get("kubetune.io/canary-version") == version:
        name = next((c["predictor"]["name"] for c in spec.get("canary") or [] if c.get("predictor", {}).get("name")), "")
    elif annotations.get("kubetune.io/model-version") == version:
        name = (spec.get("predictor") or {}).get("name", "")
    else:
        name = ""
    if not name:
        return manifest
    return {**manifest, "spec": {**manifest["spec"], "predictor": {"name": name, **manifest["spec"]["predictor"]}}}


def rollout_manifest(manifest: dict, live: dict | None, cfg: DeployConfig, mode: str, said_by: str, what: str) -> tuple[dict, str]:
    """What to roll out over `live` (the running spec, or None): the full manifest keeping a name the
    live spec gives this version, or a canary in `mode`; and the canary's name (Standard mode)."""
    if not cfg.canary_traffic_percent:
        return (keep_predictor_name(manifest, live) if live else manifest), ""
    if live is None:
        raise ConfigError(f"{what} does not exist yet: a canary needs a live revision to split traffic with; deploy without a canary first")
    return canary_manifest(manifest, live, cfg, mode, said_by, what)


def canary_manifest(manifest: dict, live: dict, cfg: DeployConfig, mode: str, said_by: str, what: str) -> tuple[dict, str]:
    """The manifest that sends cfg.canary_traffic_percent of the traffic to the new version in
    `mode`, and the canary's name (Standard mode). Refuses a mode that cannot split traffic."""
    percent = cfg.canary_traffic_percent
    if mode == "Serverless":
        return {**manifest, "spec": {**manifest["spec"], "predictor": {**manifest["spec"]["predictor"], "canaryTrafficPercent": percent}}}, ""
    if mode == "Standard":
        # the live predictor stays as it is (it keeps the rest of the traffic); the new version is the canary entry
        stable = kube.strip_server_fields(live)
        version = manifest["metadata"]["annotations"]["kubetune.io/model-version"]
        name = canary_name(version)
        predictor = {k: v for k, v in manifest["spec"]["predictor"].items() if k not in _AUTOSCALING}
        annotations = {**(stable["metadata"].get("annotations") or {}), "kubetune.io/canary-version": version}
        return {**stable, "metadata": {**stable["metadata"], "annotations": annotations},
                "spec": {**stable["spec"], "canary": [{"trafficPercent": percent, "predictor": {**predictor, "name": name}}]}}, name
    if not mode:
        raise ConfigError(f"cannot tell the KServe deployment mode of {what}: it has no {MODE_ANNOTATION} annotation and the "
                          f"ConfigMap {cfg.kserve_namespace}/{ISVC_CONFIG} could not be read; a canary needs it (Serverless and "
                          "Standard split traffic differently, and a wrong guess sends all traffic to the new version): set "
                          "--kserve-mode Serverless or Standard")
    raise ConfigError(f"{what} runs in KServe's {mode} mode (from {said_by}), which cannot split traffic: deploy without "
                      "--canary-traffic-percent, or serve it in Serverless or Standard mode")


def rollout_kserve(manifest: dict, cfg: DeployConfig, commit: Callable[[], object] = lambda: None,
                   client: kube.Kube | None = None) -> dict:
    """Apply, wait for Ready, then `commit()` (the registry alias move). If any of it fails, the
    previous spec is applied again, so the service and the alias both stay on the old version."""
    client = client or kube.connect(cfg.kubeconfig, cfg.context)
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    what = kube.INFERENCE_SERVICE.describe(ns, name)
    before = client.get(kube.INFERENCE_SERVICE, ns, name)
    canary_over_live = cfg.canary_traffic_percent and before is not None
    mode, said_by = deployment_mode(client, before, cfg) if canary_over_live else ("", "")
    manifest, canary = rollout_manifest(manifest, before, cfg, mode, said_by, what)  # a refused canary: nothing applied yet
    if cfg.canary_traffic_percent:
        log(STEP, f"{what}: KServe {mode} mode (from {said_by}): the canary is "
            + ("canaryTrafficPercent" if mode == "Serverless" else f"spec.canary entry {canary!r}"))
    try:
        applied = client.apply(manifest)
    except kube.KubeError as e:
        # strict field validation: this cluster's InferenceService CRD has no spec.canary
        if canary and re.search(r"canary\S*:? field not declared|unknown field \S*canary", str(e)):
            raise ConfigError(f"{e}: KServe before 0.20 has no Standard-mode canary (spec.canary), and canaryTrafficPercent is "
                              "ignored in Standard mode; upgrade KServe to 0.20+, or deploy without --canary-traffic-percent") from None
        raise
    log(STEP, f"applied {what} (generation {applied['metadata'].get('generation')})"
        + (f", canary {cfg.canary_traffic_percent}%" if cfg.canary_traffic_percent else ""))
    try:
        live = client.wait(kube.INFERENCE_SERVICE, ns, name, lambda o: isvc_verdict(o, applied["metadata"].get("generation"), canary),
                           timeout=cfg.timeout_seconds, interval=cfg.poll_seconds)
        url = (live.get("status") or {}).get("url")
        log(STEP, f"{what} is Ready" + (f" at {url}" if url else ""))
        commit()
    except KubetuneError as e:
        raise RolloutFailed(f"{e}; {restore_kserve(client, before, what)}") from None
    return {"target": "kserve", "namespace": ns, "name": name, "url": url, "canary_traffic_percent": cfg.canary_traffic_percent,
            "mode": mode or None, "canary": canary or None,
            "generation": applied["metadata"].get("generation"), "replaced_existing": before is not None}


def restore_kserve(client: kube.Kube, before: dict | None, what: str) -> str:
    """Re-apply the spec that was live before; says what it did (for the error message)."""
    if before is None:
        # nothing served before, so nothing to go back to; deleting is left to a person (the
        # deployer's RBAC has no delete), and the failed object shows why it failed
        return f"there was no previous {what} to restore; inspect it with kubectl describe, or delete it"
    try:
        client.apply(kube.strip_server_fields(before))
    except kube.KubeError as e:
        return f"restoring the previous spec ALSO failed: {e}"
    version = (before["metadata"].get("annotations") or {}).get("kubetune.io/model-version", "unknown version")
    log(STEP, f"rolled {what} back to its previous spec ({version})")
    return f"rolled back to the previous spec (model version {version})"


# ---------------------------------------------------------------------------------------------
# gitops


_CRED_RE = re.compile(r"(\w+://)[^/@\s]+@")


def redact(text: str) -> str:
    """Strip user:password@ from URLs in git's messages, in case a URL carried credentials."""
    return _CRED_RE.sub(r"\1***@", text)


@dataclass(frozen=True)
class GitAuth:
    username: str = ""
    token: str = ""
    ssh_key: str = ""  # path to a private key file (a mounted Secret)
    known_hosts: str = ""  # path to a known_hosts file; needed with ssh_key unless accept_new_host_key
    accept_new_host_key: bool = False  # trust a host key seen for the first time (explicit opt-in, never silent)
    author_name: str = "kubetune"
    author_email: str = "kubetune@localhost"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GitAuth":
        env = os.environ if environ is None else environ
        return cls(username=env.get("KUBETUNE_GIT_USERNAME", ""), token=env.get("KUBETUNE_GIT_TOKEN", ""),
                   ssh_key=env.get("KUBETUNE_GIT_SSH_KEY", ""), known_hosts=env.get("KUBETUNE_GIT_KNOWN_HOSTS", ""),
                   accept_new_host_key=env.get("KUBETUNE_GIT_SSH_ACCEPT_NEW_HOST_KEY", "") in ("1", "true", "yes"),
                   author_name=env.get("KUBETUNE_GIT_AUTHOR_NAME", "kubetune"),
                   author_email=env.get("KUBETUNE_GIT_AUTHOR_EMAIL", "kubetune@localhost"))

    def __repr__(self) -> str:  # never print the token
        return f"GitAuth(username={self.username!r}, token={'***' if self.token else ''!r}, ssh_key={self.ssh_key!r})"

    def env(self, workdir: Path) -> dict[str, str]:
        # GIT_ALLOW_PROTOCOL: no ext:: or fd:: transports, which run commands named in the URL
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh",
               "GIT_AUTHOR_NAME": self.author_name, "GIT_AUTHOR_EMAIL": self.author_email,
               "GIT_COMMITTER_NAME": self.author_name, "GIT_COMMITTER_EMAIL": self.author_email}
        if self.token:
            # git asks this script for the username and password; the token stays in the environment
            askpass = workdir / "askpass.sh"
            askpass.write_text('#!/bin/sh\ncase "$1" in Username*) printf %s "$KUBETUNE_GIT_USERNAME";; *) printf %s "$KUBETUNE_GIT_TOKEN";; esac\n')
            askpass.chmod(stat.S_IRWXU)
            env.update(GIT_ASKPASS=str(askpass), KUBETUNE_GIT_USERNAME=self.username or "kubetune", KUBETUNE_GIT_TOKEN=self.token)
        if self.ssh_key:
            if not self.known_hosts and not self.accept_new_host_key:
                raise ConfigError("KUBETUNE_GIT_SSH_KEY is set but KUBETUNE_GIT_KNOWN_HOSTS is not: mount a known_hosts file "
                                  "for the Git host (ssh-keyscan HOST, checked) and set KUBETUNE_GIT_KNOWN_HOSTS to it, or set "
                                  "KUBETUNE_GIT_SSH_ACCEPT_NEW_HOST_KEY=1 to trust the key seen first (open to a man in the middle)")
            hosts = f"-o UserKnownHostsFile={shlex.quote(self.known_hosts)} -o StrictHostKeyChecking=yes" if self.known_hosts \
                else "-o StrictHostKeyChecking=accept-new"
            env["GIT_SSH_COMMAND"] = f"ssh -i {shlex.quote(self.ssh_key)} -o IdentitiesOnly=yes {hosts}"
        return env


class Git:
    def __init__(self, repo_dir: Path, env: dict[str, str]):
        self.dir, self.env = repo_dir, env

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["git", *args], cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise RolloutFailed(f"git {args[0]} failed: {redact(proc.stderr.strip() or proc.stdout.strip())}")
        return proc


def commit_message(name: str, version: str, metrics: dict, run_id: str, storage_uri: str) -> str:
    """The GitOps commit message; `metrics`: the test figures to show (the task's headline)."""
    figures = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return (f"Deploy {name} {version}\n\n"
            f"Model: {storage_uri}\nRun: {run_id}\nTest metrics: {figures or 'n/a'}\n\nCommitted by kubetune (deploy target gitops).\n")


def gitops_shape(manifest: dict, cfg: DeployConfig) -> Callable[[dict | None], dict]:
    """What to commit given the file the branch holds (None: none yet): a canary in the form of the
    KServe mode the user names (the committed file is the live stable spec), or the full manifest
    keeping a predictor name the file gives this version (a Standard-mode promotion)."""
    what = f"{manifest['metadata']['name']}.yaml in {redact(cfg.gitops_repo)} {cfg.gitops_branch}"

    return lambda live: rollout_manifest(manifest, live, cfg, cfg.kserve_mode, "--kserve-mode", what)[0]


def rollout_gitops(manifest: dict, cfg: DeployConfig, auth: GitAuth, message: str, attempts: int = 3,
                   shape: Callable[[dict | None], dict] | None = None) -> dict:
    """Commit exactly one file, <gitops_path>/<name>.yaml, on top of the branch and push. A push
    that loses a race with another commit is rebased and retried; an identical manifest makes no
    commit (the desired state is already there). `shape(file on the branch or None)`: what to write
    (default: `manifest`)."""
    problems = check_git_values(cfg.gitops_repo, cfg.gitops_branch)  # again here: a caller may skip cfg.check()
    if problems:
        raise ConfigError("; ".join(problems))
    name = manifest["metadata"]["name"]
    rel = f"{cfg.gitops_path.strip('/')}/{name}.yaml" if cfg.gitops_path.strip("/") else f"{name}.yaml"
    with tempfile.TemporaryDirectory(prefix="kubetune-gitops-") as tmp:
        work = Path(tmp) / "repo"
        work.mkdir()
        git = Git(work, auth.env(Path(tmp)))
        git("init", "-q")
        git("remote", "add", "--", "origin", cfg.gitops_repo)
        for attempt in range(attempts):
            fetched = git("fetch", "-q", "--depth", "1", "--", "origin", cfg.gitops_branch, check=False)
            if fetched.returncode == 0:
                git("checkout", "-q", "-B", cfg.gitops_branch, "FETCH_HEAD")
            elif "couldn't find remote ref" in fetched.stderr.lower() or "could not find remote ref" in fetched.stderr.lower():
                git("checkout", "-q", "--orphan", cfg.gitops_branch)  # a new branch (or an empty repository)
            else:
                raise RolloutFailed(f"git fetch {redact(cfg.gitops_repo)} {cfg.gitops_branch} failed: {redact(fetched.stderr.strip())}")
            refuse_symlinks(work, rel)
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            live = _read_manifest(target) if target.is_file() else None
            target.write_text(to_yaml(shape(live) if shape else manifest))
            git("add", "--", rel)
            if git("diff", "--cached", "--quiet", check=False).returncode == 0:
                log(STEP, f"{rel} on {cfg.gitops_branch} already holds this manifest: nothing to commit")
                return {"target": "gitops", "repo": redact(cfg.gitops_repo), "branch": cfg.gitops_branch, "path": rel,
                        "commit": git("rev-parse", "HEAD").stdout.strip(), "changed": False}
            git("commit", "-q", "-m", message)
            pushed = git("push", "-q", "origin", f"HEAD:refs/heads/{cfg.gitops_branch}", check=False)
            if pushed.returncode == 0:
                commit = git("rev-parse", "HEAD").stdout.strip()
                log(STEP, f"pushed {rel} to {redact(cfg.gitops_repo)} {cfg.gitops_branch} as {commit[:12]}")
                return {"target": "gitops", "repo": redact(cfg.gitops_repo), "branch": cfg.gitops_branch, "path": rel,
                        "commit": commit, "changed": True}
            if "rejected" not in pushed.stderr and "non-fast-forward" not in pushed.stderr and "fetch first" not in pushed.stderr:
                raise RolloutFailed(f"git push to {redact(cfg.gitops_repo)} failed: {redact(pushed.stderr.strip())}")
            log(STEP, f"push lost a race (attempt {attempt + 1}/{attempts}): re-committing on the new branch head")
        raise RolloutFailed(f"git push to {redact(cfg.gitops_repo)} {cfg.gitops_branch} kept being rejected after {attempts} attempts")


def _read_manifest(path: Path) -> dict | None:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RolloutFailed(f"{path.name} in the GitOps repository is not YAML ({e}); fix or remove it") from None
    return doc if isinstance(doc, dict) and doc.get("kind") == "InferenceService" else None


# ---- a release: a published registry version rolled out to its target, then its alias moved ----


def release(store: Store, name: str, version: str, serving: ServingConfig, target: DeployConfig, run_id: str,
            auth: GitAuth | None = None, move: Callable[[], dict] | None = None) -> dict:
    """Roll a published version out to `target` and move its alias (production; `canary` for a
    KServe canary). Shared by the deploy step, `kubetune deploy` and `kubetune rollback` (which
    passes its own alias `move`). The alias moves only once the target took the version: after
    Ready (kserve), after the push (gitops)."""
    target.check()
    prefix = registry.version_prefix(name, version)
    if not store.is_published(prefix):
        raise InputError(f"{name} {version} is not published in {store.uri} (see kubetune models {name})")
    metrics = store.read_json(f"{prefix}/metrics.json")
    storage_uri = store.url(prefix)
    manifest = inference_service(name, version, storage_uri, metrics.get("run_id", run_id), serving)
    extra = {"target": target.target, "data_fingerprint": metrics.get("data_fingerprint")}
    move = move or (lambda: registry.set_alias(store, name, target.alias, version, run_id, extra))
    moved: dict = {}

    def move_alias() -> None:
        moved.update(move())
        log(STEP, f"{name}/{target.alias} -> {moved['version']}" + (f" (was {moved['previous']})" if moved.get("previous") else ""))

    if target.target == "kserve":
        rollout = rollout_kserve(manifest, target, commit=move_alias)
    elif target.target == "gitops":
        # versions published before task families existed are sequence classifiers
        shown = {k: metrics["metrics"][k] for k in tasks.get(metrics.get("task", tasks.DEFAULT)).headline}
        message = commit_message(name, version, shown, metrics.get("run_id", run_id), storage_uri)
        rollout = rollout_gitops(manifest, target, auth or GitAuth(), message, shape=gitops_shape(manifest, target))
        move_alias()
    else:
        rollout = {"target": "registry"}
        move_alias()
    return {"model_name": name, "version": version, "model_uri": storage_uri, "manifest_uri": store.url(f"{prefix}/{MANIFEST_FILE}"),
            "alias": moved, "rollout": rollout, "manifest": manifest}


def promote(store: Store, name: str, serving: ServingConfig, target: DeployConfig, run_id: str, auth: GitAuth | None = None) -> dict:
    """The canary becomes production: rolled out to all traffic (Serverless: the spec without
    canaryTrafficPercent; Standard: the stable predictor retargeted to the canary's Deployment, the
    canary entry gone), then `production` moves to it and the `canary` alias goes."""
    canary = registry.read_alias(store, name, "canary")
    if canary is None:
        raise InputError(f"{name} has no canary in {store.uri} to promote (deploy one with --canary-traffic-percent)")
    if target.canary_traffic_percent:
        raise ConfigError("--promote sends all traffic to the canary: drop --canary-traffic-percent")
    version = canary["version"]

    def move() -> dict:
        moved = registry.set_alias(store, name, registry.PRODUCTION, version, run_id, {"target": target.target, "promoted_from": "canary"})
        registry.clear_alias(store, name, "canary")
        return moved

    return release(store, name, version, serving, target, run_id, auth, move=move)


def abort_canary(store: Store, name: str, serving: ServingConfig, target: DeployConfig, run_id: str,
                 auth: GitAuth | None = None) -> dict:
    """Roll a canary back: production's version takes all traffic again (the canary entry or the
    canary revision's share goes), and the `canary` alias goes; production does not move."""
    canary, production = registry.read_alias(store, name, "canary"), registry.read_alias(store, name)
    if canary is None or production is None:
        raise InputError(f"{name} has no canary in {store.uri} to roll back" if canary is None else
                         f"{name} has a canary but no {registry.PRODUCTION} version to give its traffic back to")
    if target.canary_traffic_percent:
        raise ConfigError("rolling a canary back sends all traffic to production: drop --canary-traffic-percent")

    def move() -> dict:
        registry.clear_alias(store, name, "canary")
        log(STEP, f"{name}/canary {canary['version']} removed")
        return {**production, "previous": production.get("previous"), "canary_removed": canary["version"]}

    return release(store, name, production["version"], serving, target, run_id, auth, move=move)


def roll_back(store: Store, name: str, serving: ServingConfig, target: DeployConfig, run_id: str,
              auth: GitAuth | None = None, to: str = "") -> dict:
    """Move production back to its previous version (or `to`), rolling that version out to the
    target first (re-apply on KServe, a revert commit for GitOps), like a deploy."""
    current = registry.read_alias(store, name)
    if current is None:
        raise InputError(f"{name} has no {registry.PRODUCTION} alias in {store.uri}: nothing to roll back")
    version = to or current.get("previous")
    if not version:
        raise InputError(f"{name}/{registry.PRODUCTION} is {current['version']} and has no previous version to roll back to")
    if target.canary_traffic_percent:
        raise ConfigError("a rollback sends all traffic to the previous version: drop --canary-traffic-percent")
    return release(store, name, version, serving, target, run_id, auth,
                   move=lambda: registry.rollback(store, name, run_id, to=version))
