"""Kubernetes manifests and Dockerfiles.

deploy/check.sh must pass on the real tree and fail, naming the culprit, on broken copies of it.
The rendered overlays must also say the right things: native gRPC probes, non-root read-only
containers, a NetworkPolicy that lets only inference pods call the merge service, GPUs only in the
gpu overlay, grace periods that cover the servers' drain, references that resolve.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
GPU = "nvidia.com/gpu"
Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# helpers


def run_check(deploy_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(deploy_dir / "check.sh")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )


def kustomize(directory: Path) -> list[Doc]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def with_components(overlay: str, workdir: Path) -> Path:
    """A kustomization putting every component on top of ``overlay``, as an operator's overlay would."""
    workdir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(K8S, workdir)
    lines = ["resources:", f"  - {rel}/overlays/{overlay}", "components:"]
    lines += [f"  - {rel}/components/{c}" for c in COMPONENTS]
    (workdir / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return workdir


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(deployment: Doc) -> Doc:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: Doc) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """matchLabels / matchExpressions (In, NotIn, Exists, DoesNotExist) against ``labels``."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def config(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps (envFrom) and literal env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"]).get("data") or {})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
_FACTOR = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_FACTOR |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> float:
    m = _QUANTITY.match(str(text))
    assert m, f"not a Kubernetes quantity: {text!r}"
    return float(m.group(1)) * _FACTOR[m.group(2)]


def port_of(container: Doc, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def grpc_port_from_listen(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Every overlay, and every overlay with all components, rendered once for the module."""
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    base = tmp_path_factory.mktemp("combos")
    for name in OVERLAYS:
        out[f"{name}+components"] = kustomize(with_components(name, base / name))
    return out


@pytest.fixture(params=OVERLAYS + [f"{o}+components" for o in OVERLAYS])
def docs(request: pytest.FixtureRequest, rendered: dict[str, list[Doc]]) -> Iterator[list[Doc]]:
    yield rendered[request.param]


@pytest.fixture()
def deploy_copy(tmp_path: Path) -> Path:
    """A private copy of deploy/ to break."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# deploy/check.sh


def test_overlays_exist() -> None:
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    assert {"s3", "s3-irsa", "merge-cache-pvc", "auth"} <= set(COMPONENTS)


def test_check_passes_on_the_real_manifests() -> None:
    result = run_check(DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * len(OVERLAYS), lines
    for name in OVERLAYS:
        assert any(re.match(rf"ok +overlay {name}: \d+ objects valid for Kubernetes 1\.33", x) for x in lines)
        assert any(x.startswith(f"ok   overlay {name} + components ") for x in lines)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


BREAKAGES = {
    # name: (file under deploy/k8s, old, new, overlays expected to fail, words the failure must name)
    "unknown field": (
        "base/merge-deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesytem: true",
        OVERLAYS,
        ["deployment/loramerge-merge", "readOnlyRootFilesytem"],
    ),
    "wrong type": (
        "overlays/gpu/inference-gpu.yaml",
        "      tolerations:",
        '      terminationGracePeriodSeconds: "ninety"\n      tolerations:',
        ["gpu"],
        ["deployment/loramerge-inference", "terminationGracePeriodSeconds", "ninety"],
    ),
    "misspelt kind": (
        "base/inference-pdb.yaml",
        "kind: PodDisruptionBudget",
        "kind: PodDisruptionBuget",
        OVERLAYS,
        ["PodDisruptionBuget"],
    ),
    "kustomize error": (
        "overlays/cpu/kustomization.yaml",
        "path: inference-resources.yaml",
        "path: inference-resource.yaml",
        ["cpu"],
        ["kustomize", "inference-resource.yaml"],
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_check_fails_on_a_broken_manifest(case: str, deploy_copy: Path) -> None:
    path, old, new, failing, words = BREAKAGES[case]
    _edit(deploy_copy / "k8s" / path, old, new)

    result = run_check(deploy_copy)

    assert result.returncode != 0
    report = result.stdout
    for name in OVERLAYS:
        if name in failing:
            assert f"FAIL overlay {name}:" in report, report
        else:
            assert f"ok   overlay {name}:" in report, report
    failure_text = report[report.index("FAIL") :]
    for word in words:
        assert word in failure_text, f"{word!r} not named in:\n{report}"


def test_check_fails_on_a_broken_component(deploy_copy: Path) -> None:
    _edit(deploy_copy / "k8s/components/s3/kustomization.yaml", "optional: true", "optional: maybe")
    result = run_check(deploy_copy)
    assert result.returncode != 0
    for name in OVERLAYS:
        assert f"ok   overlay {name}:" in result.stdout
        assert re.search(rf"FAIL overlay {name} \+ components [^\n]*s3", result.stdout), result.stdout
    assert "maybe" in result.stdout


def test_check_fails_when_nothing_renders(deploy_copy: Path) -> None:
    for name in OVERLAYS:
        (deploy_copy / "k8s/overlays" / name / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: loramerge\n"
        )
    shutil.rmtree(deploy_copy / "k8s/components")
    result = run_check(deploy_copy)
    assert result.returncode != 0
    assert "rendered no objects" in result.stdout


# ---------------------------------------------------------------------------------------------
# what the rendered manifests say


def test_every_object_is_namespaced_to_loramerge(docs: list[Doc]) -> None:
    for d in docs:
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == "loramerge"
        else:
            assert d["metadata"].get("namespace") == "loramerge", f"{d['kind']}/{d['metadata']['name']}"


def test_probes_are_native_grpc_on_the_listen_port(docs: list[Doc]) -> None:
    deployments = of_kind(docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"loramerge-merge", "loramerge-inference"}
    for dep in deployments:
        for c in pod_spec(dep)["containers"]:
            env = config(docs, c)
            prefix = (
                "LORAMERGE_MERGE_" if dep["metadata"]["name"] == "loramerge-merge" else "LORAMERGE_INFERENCE_"
            )
            port = grpc_port_from_listen(env[prefix + "LISTEN"])
            assert port_of(c, "grpc") == port
            assert port_of(c, "metrics") == int(env[prefix + "METRICS_PORT"])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c[kind]
                handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & probe.keys()
                assert handlers == {"grpc"}, f"{kind} of {c['name']} uses {handlers}"
                assert probe["grpc"]["port"] == port


def test_containers_run_as_non_root_with_a_read_only_root(docs: list[Doc]) -> None:
    for dep in of_kind(docs, "Deployment"):
        spec = pod_spec(dep)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            # With a read-only root, whatever the process writes must be a volume.
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/loramerge"} <= mounts


def test_network_policy_lets_only_inference_pods_reach_the_merge_service(docs: list[Doc]) -> None:
    merge = pod_labels(one(docs, "Deployment", "loramerge-merge"))
    inference = pod_labels(one(docs, "Deployment", "loramerge-inference"))
    merge_container = pod_spec(one(docs, "Deployment", "loramerge-merge"))["containers"][0]
    grpc_port = port_of(merge_container, "grpc")

    policies = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], merge)]
    assert len(policies) == 1
    policy = policies[0]["spec"]
    assert not selects(policy["podSelector"], inference)
    assert "Ingress" in policy["policyTypes"]

    def covers_grpc(rule: Doc) -> bool:
        ports = rule.get("ports")
        return not ports or any(p.get("port") in (grpc_port, "grpc") for p in ports)

    grpc_rules = [r for r in policy["ingress"] if covers_grpc(r)]
    assert grpc_rules, "no rule admits the gRPC port"
    for rule in grpc_rules:
        peers = rule.get("from")
        assert peers, "a rule without 'from' admits everyone"
        for peer in peers:
            assert "ipBlock" not in peer and "namespaceSelector" not in peer, peer
            assert selects(peer["podSelector"], inference)
            assert not selects(peer["podSelector"], merge)
            assert peer["podSelector"].get("matchLabels") or peer["podSelector"].get("matchExpressions")


def test_merge_service_is_headless_and_the_inference_service_resolves_it(docs: list[Doc]) -> None:
    svc = one(docs, "Service", "loramerge-merge")
    assert svc["spec"]["clusterIP"] == "None"
    assert selects(
        {"matchLabels": svc["spec"]["selector"]}, pod_labels(one(docs, "Deployment", "loramerge-merge"))
    )
    grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")

    inference = pod_spec(one(docs, "Deployment", "loramerge-inference"))["containers"][0]
    target = config(docs, inference)["LORAMERGE_INFERENCE_MERGE_SERVICE"]
    ns = svc["metadata"]["namespace"]
    assert target == f"dns:///{svc['metadata']['name']}.{ns}.svc.cluster.local:{grpc['port']}"

    isvc = one(docs, "Service", "loramerge-inference")
    assert selects(
        {"matchLabels": isvc["spec"]["selector"]}, pod_labels(one(docs, "Deployment", "loramerge-inference"))
    )


def _gpu_amounts(container: Doc) -> tuple[Any, Any]:
    res = container.get("resources") or {}
    return (res.get("requests") or {}).get(GPU), (res.get("limits") or {}).get(GPU)


def test_gpu_overlay_requests_gpus_and_cpu_overlay_none(rendered: dict[str, list[Doc]]) -> None:
    for label, docs in rendered.items():
        for dep in of_kind(docs, "Deployment"):
            for c in pod_spec(dep)["containers"]:
                request, limit = _gpu_amounts(c)
                image = c["image"]
                if label.startswith("gpu"):
                    assert request is not None and int(request) >= 1, f"{label} {c['name']}"
                    assert request == limit  # extended resources are not overcommitted
                    assert any(t["key"] == GPU for t in pod_spec(dep).get("tolerations", []))
                    assert image.endswith("-gpu")
                else:
                    assert request is None and limit is None, f"{label} {c['name']}"
                    assert GPU not in yaml.safe_dump(dep)
                    assert image.endswith("-cpu")


def test_termination_grace_covers_drain_and_grace(docs: list[Doc]) -> None:
    for dep in of_kind(docs, "Deployment"):
        spec = pod_spec(dep)
        env = config(docs, spec["containers"][0])
        prefix = (
            "LORAMERGE_MERGE_" if dep["metadata"]["name"] == "loramerge-merge" else "LORAMERGE_INFERENCE_"
        )
        drain = float(env[prefix + "DRAIN_SECONDS"])
        grace = float(env[prefix + "GRACE_SECONDS"])
        pre_stop = 0
        for c in spec["containers"]:
            pre_stop = max(
                pre_stop, ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
            )
        # and at least 5 s for the process to exit after the last call
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + grace + 5, dep["metadata"]["name"]


def test_hot_loaded_adapters_live_in_memory(docs: list[Doc]) -> None:
    spec = pod_spec(one(docs, "Deployment", "loramerge-inference"))
    c = spec["containers"][0]
    adapter_dir = config(docs, c)["LORAMERGE_INFERENCE_ADAPTER_DIR"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == adapter_dir)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert quantity(volume["emptyDir"]["sizeLimit"]) > 0
    # tmpfs pages count against the container's memory limit
    memory_volumes = sum(
        quantity(v["emptyDir"]["sizeLimit"])
        for v in spec["volumes"]
        if (v.get("emptyDir") or {}).get("medium") == "Memory"
    )
    assert memory_volumes < quantity(c["resources"]["limits"]["memory"])


def _volume_holding(docs: list[Doc], spec: Doc, container: Doc, path: str) -> tuple[str, float]:
    """The volume ``path`` lies on (the deepest mount above it) and its size bound in bytes."""
    mounts = [
        m for m in container["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume: the root filesystem is read-only"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    sources = {"emptyDir", "persistentVolumeClaim"} & volume.keys()
    assert len(sources) == 1, volume  # a patch that left two volume sources behind is invalid
    if "persistentVolumeClaim" in volume:
        claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        return volume["name"], quantity(claim["spec"]["resources"]["requests"]["storage"])
    return volume["name"], quantity(volume["emptyDir"]["sizeLimit"])


def test_merge_caches_fit_their_volumes_and_memory(docs: list[Doc]) -> None:
    spec = pod_spec(one(docs, "Deployment", "loramerge-merge"))
    c = spec["containers"][0]
    env = config(docs, c)
    used: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for directory, bound in (("CACHE_DIR", "CACHE_DISK_BYTES"), ("S3_CACHE_DIR", "S3_CACHE_BYTES")):
        name, size = _volume_holding(docs, spec, c, env["LORAMERGE_MERGE_" + directory])
        used[name] = used.get(name, 0) + int(env["LORAMERGE_MERGE_" + bound])
        sizes[name] = size
    for name, total in used.items():
        # an emptyDir over its sizeLimit gets the pod evicted
        assert total < sizes[name], f"caches on {name}: {total} bytes, volume {sizes[name]}"
    assert int(env["LORAMERGE_MERGE_CACHE_MEMORY_BYTES"]) < quantity(c["resources"]["limits"]["memory"])


def test_references_resolve(docs: list[Doc]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    deployments = of_kind(docs, "Deployment")
    for dep in deployments:
        spec = pod_spec(dep)
        assert ("ServiceAccount", spec["serviceAccountName"]) in names
        assert selects(dep["spec"]["selector"], pod_labels(dep))
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        for c in spec["containers"]:
            for source in c.get("envFrom") or []:
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                else:  # Secrets are the operator's to create: they must be optional
                    assert source["secretRef"]["optional"] is True
            for var in c.get("env") or []:
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["optional"] is True
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in names
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        target_dep = one(docs, "Deployment", target["name"])
        assert "replicas" not in target_dep["spec"]  # the HPA owns the count
        for c in pod_spec(target_dep)["containers"]:
            assert "cpu" in c["resources"]["requests"]  # utilisation is relative to the request
    pdbs = of_kind(docs, "PodDisruptionBudget")
    assert len(pdbs) == len(deployments)
    for pdb in pdbs:
        assert sum(selects(pdb["spec"]["selector"], pod_labels(d)) for d in deployments) == 1


def test_s3_component_gives_credentials_to_the_merge_service_only(rendered: dict[str, list[Doc]]) -> None:
    for overlay in OVERLAYS:
        docs = rendered[f"{overlay}+components"]
        merge = pod_spec(one(docs, "Deployment", "loramerge-merge"))["containers"][0]
        inference = pod_spec(one(docs, "Deployment", "loramerge-inference"))["containers"][0]
        secrets = [s["secretRef"] for s in merge["envFrom"] if "secretRef" in s]
        assert secrets == [{"name": "loramerge-s3", "optional": True}]
        assert any("configMapRef" in s for s in merge["envFrom"])  # the patch appended, not replaced
        assert not any("secretRef" in s for s in inference.get("envFrom") or [])
        assert config(docs, merge)["LORAMERGE_MERGE_S3_REGION"]

        sa = one(docs, "ServiceAccount", "loramerge-merge")
        arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", arn)
        assert "annotations" not in one(docs, "ServiceAccount", "loramerge-inference")["metadata"]

        plain = rendered[overlay]
        assert "eks.amazonaws.com/role-arn" not in yaml.safe_dump_all(plain)


def _secret_behind(spec: Doc, container: Doc, path: str) -> tuple[str, str]:
    """(Secret name, key) of a file path on a mounted Secret volume."""
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert mount.get("readOnly") is True
    assert volume["secret"].get("optional") is not True  # fail closed: no token file, no pod
    return volume["secret"]["secretName"], path[len(mount["mountPath"].rstrip("/")) + 1 :]


def test_auth_component_shares_the_merge_token_between_server_and_client(
    rendered: dict[str, list[Doc]],
) -> None:
    for overlay in OVERLAYS:
        docs = rendered[f"{overlay}+components"]
        merge_spec = pod_spec(one(docs, "Deployment", "loramerge-merge"))
        inf_spec = pod_spec(one(docs, "Deployment", "loramerge-inference"))
        merge, inference = merge_spec["containers"][0], inf_spec["containers"][0]
        server = _secret_behind(merge_spec, merge, config(docs, merge)["LORAMERGE_MERGE_AUTH_TOKEN_FILE"])
        inf_env = config(docs, inference)
        client = _secret_behind(inf_spec, inference, inf_env["LORAMERGE_INFERENCE_MERGE_AUTH_TOKEN_FILE"])
        own = _secret_behind(inf_spec, inference, inf_env["LORAMERGE_INFERENCE_AUTH_TOKEN_FILE"])
        assert server == client
        assert own[0] != server[0]
        assert "AUTH_TOKEN_FILE" not in yaml.safe_dump_all(rendered[overlay])
        # Admin tokens: each service's own Secret, key "admin-token"; the inference pod sees only the
        # merge Secret's user token.
        merge_admin = config(docs, merge)["LORAMERGE_MERGE_ADMIN_TOKEN_FILE"]
        assert _secret_behind(merge_spec, merge, merge_admin) == (server[0], "admin-token")
        inf_admin = _secret_behind(inf_spec, inference, inf_env["LORAMERGE_INFERENCE_ADMIN_TOKEN_FILE"])
        assert inf_admin == (own[0], "admin-token")
        merge_volume = next(
            v for v in inf_spec["volumes"] if (v.get("secret") or {}).get("secretName") == server[0]
        )
        assert [i["key"] for i in merge_volume["secret"]["items"]] == ["token"]


@pytest.mark.parametrize(
    ("deployment", "module", "cls_name", "prefix"),
    [
        ("loramerge-merge", "merge_service.settings", "MergeSettings", "LORAMERGE_MERGE_"),
        ("loramerge-inference", "inference_service.settings", "InferenceSettings", "LORAMERGE_INFERENCE_"),
    ],
)
def test_configured_settings_are_the_services_own(
    deployment: str, module: str, cls_name: str, prefix: str, rendered: dict[str, list[Doc]]
) -> None:
    """Every LORAMERGE_* variable the manifests set is one the service declares, and the service's
    own settings loader accepts its value (a misspelt name would be silently ignored at run time)."""
    import dataclasses
    import importlib

    from loramerge_common.settings import env_name, load_settings

    cls = getattr(importlib.import_module(module), cls_name)
    known = {env_name(prefix, f.name) for f in dataclasses.fields(cls)}
    for label, docs in rendered.items():
        env = config(docs, pod_spec(one(docs, "Deployment", deployment))["containers"][0])
        unknown = sorted(k for k in env if k.startswith(prefix) and k not in known)
        assert not unknown, f"{label}: {deployment} sets {unknown}, which {cls_name} does not declare"
        settings = load_settings(cls, prefix, argv=[], environ=env)
        if hasattr(settings, "validate"):
            settings.validate()
        assert settings.listen == env[prefix + "LISTEN"]
        assert settings.grace_seconds == float(env[prefix + "GRACE_SECONDS"])


# ---------------------------------------------------------------------------------------------
# Dockerfiles


DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


def test_dockerfiles_exist() -> None:
    assert {p.suffix for p in DOCKERFILES} == {".cpu", ".gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(path: Path) -> None:
    result = subprocess.run(
        ["hadolint", "-c", str(DEPLOY / "docker/.hadolint.yaml"), str(path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(path: Path) -> dict[str, list[dockerfile.Command]]:
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd == "FROM":
            current = []
            name = cmd.value[2] if len(cmd.value) == 3 and cmd.value[1].upper() == "AS" else f"#{len(stages)}"
            stages[name] = current
            current.append(cmd)
        else:
            current.append(cmd)
    return stages


def _chain(stages: dict[str, list[dockerfile.Command]], name: str) -> list[dockerfile.Command]:
    """A stage's commands with those of the stages it is built FROM, oldest first."""
    cmds = stages[name]
    parent = cmds[0].value[0]
    return (_chain(stages, parent) if parent in stages else []) + cmds


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_make_and_runs_each_service_as_the_manifest_user(
    path: Path, rendered: dict[str, list[Doc]]
) -> None:
    flavour = path.suffix.lstrip(".")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    stages = _stages(path)
    assert {"merge-service", "inference-service"} <= stages.keys()

    # The install is `make install-runtime` with the flavour's extra, and the extras exist.
    runs = [
        c for cmds in stages.values() for c in cmds if c.cmd == "RUN" and "make install-runtime" in c.value[0]
    ]
    assert len(runs) == 1
    extras = re.search(r"RUNTIME_EXTRAS=([\w,]+)", runs[0].value[0]).group(1).split(",")
    assert flavour in extras
    assert set(extras) <= pyproject["project"]["optional-dependencies"].keys()
    assert "dev" not in extras
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install-runtime:", makefile, re.M)

    # Everything setuptools packages is copied into the build context of that stage.
    copied = {
        Path(src.rstrip("/")).parts[0]
        for c in stages[next(n for n, cmds in stages.items() if runs[0] in cmds)]
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    }
    # ... and the client distribution the services depend on (make install-runtime installs ./clients first).
    package_dirs = {"pyproject.toml", "README.md", "Makefile", "clients"}
    for pkg in pyproject["tool"]["setuptools"]["packages"]:
        package_dirs.add(pkg.split(".")[0])
    assert package_dirs <= copied, package_dirs - copied
    assert re.search(r"^\tpip install -q \./clients$|\$\(BIN\)/pip install -q \./clients", makefile, re.M)
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not package_dirs & ignored

    scripts = pyproject["project"]["scripts"]
    k8s_user = {pod_spec(d)["securityContext"]["runAsUser"] for d in of_kind(rendered[flavour], "Deployment")}
    for target, script in (
        ("merge-service", "loramerge-merge-service"),
        ("inference-service", "loramerge-inference-service"),
    ):
        cmds = _chain(stages, target)
        entrypoint = [c for c in cmds if c.cmd == "ENTRYPOINT"][-1]
        assert entrypoint.json and list(entrypoint.value) == [script]  # exec form: SIGTERM reaches it
        assert script in scripts
        user = [c for c in cmds if c.cmd == "USER"][-1].value[0]
        assert {int(user.split(":")[0])} == k8s_user
