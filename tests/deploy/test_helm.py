"""The Helm chart (deploy/helm/ptserve) against Kubernetes' schemas and against the code.

No cluster and no helm binary: helm-python-sdk (Helm 4's Go library) lints and renders the chart
offline with each value set in the chart's ci/ folder, kubernetes-validate checks every built-in
manifest strictly (unknown fields fail) for several Kubernetes versions, and the KEDA and Prometheus
Operator resources are checked against closed schemas of their documented fields (crd_schemas.py).
The rest reads the rendered manifests the way the cluster would and checks them against ptserve:
settings, routes, the job stream, the API-key format, the image's user.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

import service.metrics
from prompts.jobs import GROUP, JobQueue
from service.settings import API_KEY_ENTRY, Settings
from tests.deploy.crd_schemas import CRD_SCHEMAS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "ptserve"
RELEASE = "demo"
NAMESPACE = "ml"
VALUE_SETS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
# The oldest the chart declares (Chart.yaml kubeVersion), a common one, and the newest bundled.
KUBERNETES_VERSIONS = ("1.25", "1.29", ".".join(latest_version().split(".")[:2]))
KEY = "admin:" + "a" * 64

Manifest = dict[str, Any]


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def value_set(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(
        (CHART / "ci" / f"{name}-values.yaml").read_text(encoding="utf-8")
    )
    return values


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def render(chart: helm.Chart, values: dict[str, Any]) -> list[Manifest]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def render_set(chart: helm.Chart, name: str, **override: Any) -> list[Manifest]:
    return render(chart, merged(value_set(name), override))


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    (doc,) = find(docs, kind, name)
    return doc


def deployment(docs: list[Manifest], component: str) -> Manifest:
    return one(docs, "Deployment", f"{RELEASE}-ptserve-{component}")


def container(docs: list[Manifest], component: str) -> Manifest:
    containers: list[Manifest] = deployment(docs, component)["spec"]["template"]["spec"]["containers"]
    (only,) = containers
    return only


def env(docs: list[Manifest], component: str) -> dict[str, Any]:
    """A container's env entries by name: the literal value, or the valueFrom reference."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs, component)["env"]}


def triggers(docs: list[Manifest], component: str) -> list[Manifest]:
    found: list[Manifest] = one(docs, "ScaledObject", f"{RELEASE}-ptserve-{component}")["spec"]["triggers"]
    return found


def render_error(chart: helm.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(chart, values)
    return str(caught.value)


# ------------------------------------------------------------------------------------------ lint and schemas


def test_the_ci_folder_holds_the_value_sets_this_module_expects() -> None:
    expected = {
        "default",
        "production",
        "sentinel",
        "cluster",
        "gpu",
        "ingress-hpa",
        "minimal",
        "existing-secrets",
    }
    assert set(VALUE_SETS) == expected


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_cleanly_in_strict_mode(name: str) -> None:
    report = helm.lint(CHART, value_set(name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 2 and 3 are warnings and errors; 1 (info) is only Chart.yaml's missing icon.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_strictly(chart: helm.Chart, name: str) -> None:
    docs = render_set(chart, name)
    assert docs
    for doc in docs:
        assert doc["metadata"]["name"].startswith(RELEASE), doc["metadata"]["name"]
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            jsonschema.validate(doc, crd)
            behavior = (
                doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
            )
            if behavior is not None:
                validate_builtin(hpa_with(behavior))
            continue
        validate_builtin(doc)


def validate_builtin(doc: Manifest) -> None:
    for version in KUBERNETES_VERSIONS:
        # Raises on a field, type or enum the schema refuses; a kind it does not know is an error too.
        kubernetes_validate.validate(doc, version, strict=True)


def hpa_with(behavior: dict[str, Any]) -> Manifest:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior-check"},
        "spec": {
            "scaleTargetRef": {"kind": "Deployment", "name": "x"},
            "maxReplicas": 2,
            "behavior": behavior,
        },
    }


def test_strict_validation_fails_on_a_misspelt_field(chart: helm.Chart) -> None:
    docs = render_set(chart, "production")
    broken = copy.deepcopy(deployment(docs, "server"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate({**broken, "kind": "Deploymnet"}, KUBERNETES_VERSIONS[-1], strict=True)
    scaled = copy.deepcopy(one(docs, "ScaledObject", f"{RELEASE}-ptserve-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["streamLenght"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    # A consumer group turns streamLength into pending entries in KEDA: refused.
    scaled = copy.deepcopy(one(docs, "ScaledObject", f"{RELEASE}-ptserve-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] = GROUP
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"server": {"replicas": "two"}}, "replicas"),
        ({"server": {"replica": 2}}, "replica"),
        ({"auth": {"apiKeys": ["admin:not-a-sha256"]}}, "apiKeys"),
        ({"config": {"PTSERVE_STORE": "/data"}}, "PTSERVE_STORE"),
        ({"autoscaling": {"kind": "vpa"}}, "kind"),
        ({"redis": {"sentinel": {"hosts": ["sentinel-without-port"]}}}, "hosts"),
        ({"worker": {"autoscaling": {"metric": "pendingEntries"}}}, "metric"),
    ],
)
def test_values_schema_rejects_bad_values(chart: helm.Chart, override: dict[str, Any], named: str) -> None:
    values = merged(value_set("default"), override)
    with pytest.raises(helm.HelmValuesError, match=named):
        chart.validate_schema(values)
    assert named in render_error(chart, values)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(m["severity"] == 3 for m in report["messages"]), report


def test_schema_accepts_exactly_the_key_entries_ptserve_accepts() -> None:
    schema = (CHART / "values.schema.json").read_text(encoding="utf-8")
    (pattern,) = re.findall(r'"pattern": "(\^\(classify[^"]*)"', schema)
    assert pattern.replace("\\\\", "\\") == API_KEY_ENTRY.pattern


# ------------------------------------------------------------------------------------------ Redis and keys


def test_redis_url_is_used_as_is(chart: helm.Chart) -> None:
    docs = render_set(chart, "default")
    assert env(docs, "server")["PTSERVE_STORE"] == value_set("default")["redis"]["url"]
    assert "REDIS_PASSWORD" not in env(docs, "server")


def test_sentinel_values_build_ptserve_sentinel_url_with_the_password_from_a_secret(
    chart: helm.Chart,
) -> None:
    docs = render_set(chart, "sentinel")
    hosts = ",".join(value_set("sentinel")["redis"]["sentinel"]["hosts"])
    for component in ("server", "worker"):
        entries = container(docs, component)["env"]
        names = [e["name"] for e in entries]
        assert (
            env(docs, component)["PTSERVE_STORE"] == f"redis+sentinel://:$(REDIS_PASSWORD)@{hosts}/mymaster/2"
        )
        assert env(docs, component)["REDIS_PASSWORD"] == {
            "secretKeyRef": {"name": "redis", "key": "password"}
        }
        # Kubernetes expands $(VAR) only from entries defined earlier in the list.
        assert names.index("REDIS_PASSWORD") < names.index("PTSERVE_STORE")


def test_cluster_values_build_ptserve_cluster_url(chart: helm.Chart) -> None:
    nodes = ",".join(value_set("cluster")["redis"]["cluster"]["nodes"])
    assert env(render_set(chart, "cluster"), "worker")["PTSERVE_STORE"] == f"redis+cluster://{nodes}"
    with_password = render_set(chart, "cluster", redis={"auth": {"existingSecret": "redis"}})
    assert env(with_password, "server")["PTSERVE_STORE"] == f"redis+cluster://:$(REDIS_PASSWORD)@{nodes}"


@pytest.mark.parametrize(
    "redis",
    [
        {"url": ""},
        {"url": "redis://a:6379/0", "sentinel": {"hosts": ["s:26379"]}},
        {"url": "", "sentinel": {"hosts": ["s:26379"]}, "cluster": {"nodes": ["n:6379"]}},
    ],
)
def test_exactly_one_redis_form_is_required(chart: helm.Chart, redis: dict[str, Any]) -> None:
    message = render_error(chart, merged(value_set("default"), {"redis": redis}))
    assert "set exactly one of redis.url, redis.sentinel.hosts or redis.cluster.nodes" in message


def test_api_keys_come_from_a_secret_the_chart_creates(chart: helm.Chart) -> None:
    docs = render_set(chart, "production")
    secret = one(docs, "Secret")
    reference = {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "api-keys"}}
    assert env(docs, "server")["PTSERVE_API_KEYS"] == reference
    assert env(docs, "server")["PTSERVE_AUTH"] == "on"
    assert secret["stringData"]["api-keys"] == ",".join(value_set("production")["auth"]["apiKeys"])
    # The worker answers no requests: it gets no keys.
    assert "PTSERVE_API_KEYS" not in env(docs, "worker")


def test_api_keys_from_an_existing_secret(chart: helm.Chart) -> None:
    docs = render_set(chart, "existing-secrets")
    assert find(docs, "Secret") == []
    assert env(docs, "server")["PTSERVE_API_KEYS"] == {
        "secretKeyRef": {"name": "ptserve-keys", "key": "entries"}
    }
    assert env(docs, "server")["REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "redis-credentials", "key": "redis-password"}
    }


def test_auth_on_without_keys_is_refused_and_off_is_explicit(chart: helm.Chart) -> None:
    message = render_error(chart, merged(value_set("default"), {"auth": {"apiKeys": []}}))
    assert "auth.apiKeys" in message and "auth.existingSecret" in message
    docs = render_set(chart, "minimal")
    assert env(docs, "server")["PTSERVE_AUTH"] == "off"
    assert "PTSERVE_API_KEYS" not in env(docs, "server") and find(docs, "Secret") == []


def test_changed_keys_roll_the_service(chart: helm.Chart) -> None:
    def checksum(keys: list[str]) -> str:
        docs = render_set(chart, "default", auth={"apiKeys": keys})
        annotations = deployment(docs, "server")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/api-keys"]
        return value

    assert checksum([KEY]) != checksum([KEY, "classify:" + "b" * 64])


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("name", VALUE_SETS)
def test_environment_is_made_of_real_settings_with_valid_values(
    chart: helm.Chart, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    docs = render_set(chart, name)
    config = one(docs, "ConfigMap")["data"]
    fields = set(Settings.model_fields)
    for component in ("server", "worker"):
        if not find(docs, "Deployment", f"{RELEASE}-ptserve-{component}"):
            continue
        spec = container(docs, component)
        assert spec["envFrom"] == [{"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}}]
        variables = {**config, **env(docs, component)}
        settings_env = {k: v for k, v in variables.items() if k.startswith("PTSERVE_")}
        unknown = {k.removeprefix("PTSERVE_").lower() for k in settings_env} - fields
        assert not unknown, f"{name}/{component}: not settings: {sorted(unknown)}"
        for key in [k for k in os.environ if k.startswith("PTSERVE_")]:
            monkeypatch.delenv(key)
        mounts = {m["mountPath"] for m in spec["volumeMounts"]}
        for key, value in settings_env.items():
            if key == "PTSERVE_API_KEYS":
                secrets = find(docs, "Secret")
                value = secrets[0]["stringData"]["api-keys"] if secrets else KEY
            elif key == "PTSERVE_DATA_ROOT":
                # Settings checks the directory exists: in the pod it is a mounted volume.
                assert value in mounts, f"{name}/{component}: {value} is not mounted"
                value = str(tmp_path)
            assert isinstance(value, str), f"{name}/{component}: {key} is {value!r}"
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.host == "0.0.0.0"
        assert settings.device == ("cuda" if name == "gpu" else "cpu")


# ------------------------------------------------------------------------------------------ service pods


def test_probes_use_the_health_routes_on_the_served_port(chart: helm.Chart) -> None:
    from service.app import create_app

    docs = render_set(chart, "default")
    spec = container(docs, "server")
    (port,) = spec["ports"]
    assert (
        port["name"] == "http"
        and str(port["containerPort"]) == one(docs, "ConfigMap")["data"]["PTSERVE_PORT"]
    )
    probes = {kind: spec[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "http"}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": "http"}
    assert probes["startupProbe"] == {"path": "/healthz", "port": "http"}
    routes = set(create_app(Settings(auth="off")).openapi()["paths"])
    assert {p["path"] for p in probes.values()} <= routes
    # Loading a large backbone takes minutes: the startup budget is 10 minutes by default.
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    longer = container(render_set(chart, "gpu"), "server")["startupProbe"]
    assert longer["periodSeconds"] * longer["failureThreshold"] == 900


def test_termination_grace_covers_the_request_timeout(chart: helm.Chart) -> None:
    default_timeout = Settings.model_fields["request_timeout_s"].default
    for name, timeout in (("default", default_timeout), ("ingress-hpa", 120)):
        docs = render_set(chart, name)
        pod = deployment(docs, "server")["spec"]["template"]["spec"]
        assert float(one(docs, "ConfigMap")["data"]["PTSERVE_REQUEST_TIMEOUT_S"]) == timeout
        (sleep,) = [int(a) for a in pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1:]]
        assert pod["terminationGracePeriodSeconds"] > timeout + sleep
    pinned = render_set(chart, "default", server={"terminationGracePeriodSeconds": 200})
    assert deployment(pinned, "server")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 200


def test_rollouts_keep_every_ready_replica_until_the_new_one_is_ready(chart: helm.Chart) -> None:
    strategy = deployment(render_set(chart, "default"), "server")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pods_run_as_the_images_user_with_a_read_only_root(chart: helm.Chart) -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    (uid,) = re.findall(r"useradd .*--uid (\d+)", dockerfile)
    docs = render_set(chart, "production")
    for component in ("server", "worker"):
        pod = deployment(docs, component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(uid)
        spec = pod["containers"][0]
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # What ptserve and its libraries write goes to an emptyDir.
        tmp = [v for v in pod["volumes"] if v["name"] == "tmp"]
        assert tmp == [{"name": "tmp", "emptyDir": {}}]
        assert {"name": "tmp", "mountPath": "/tmp"} in spec["volumeMounts"]
        assert env(docs, component)["HOME"] == "/tmp"
        assert pod["automountServiceAccountToken"] is False


def test_resources_and_topology_spread(chart: helm.Chart) -> None:
    docs = render_set(chart, "default")
    pod = deployment(docs, "server")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    selector = deployment(docs, "server")["spec"]["selector"]["matchLabels"]
    keys = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
    assert keys == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    assert all(c["labelSelector"] == {"matchLabels": selector} for c in pod["topologySpreadConstraints"])
    assert "nvidia.com/gpu" not in str(pod) and "tolerations" not in pod


def test_gpu_values(chart: helm.Chart) -> None:
    docs = render_set(chart, "gpu")
    for component in ("server", "worker"):
        pod = deployment(docs, component)["spec"]["template"]["spec"]
        spec = pod["containers"][0]
        assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["image"] == "registry.example.com/ptserve:0.1.0-cuda"
        assert env(docs, component)["PTSERVE_DEVICE"] == "cuda"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in spec["volumeMounts"]
        assert env(docs, component)["PTSERVE_MODEL"] == "/models/deberta-v3-base"
    assert container(docs, "server")["resources"]["limits"]["memory"] == "32Gi"
    assert env(docs, "server")["PTSERVE_DTYPE"] == "bfloat16"
    # Training runs in float32 whatever the service serves in.
    assert "PTSERVE_DTYPE" not in env(docs, "worker")


def test_service_pdb_and_service_monitor_select_only_the_service_pods(chart: helm.Chart) -> None:
    docs = render_set(chart, "production")
    server_labels = deployment(docs, "server")["spec"]["template"]["metadata"]["labels"]
    worker_labels = deployment(docs, "worker")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    service = one(docs, "Service")
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(service["spec"]["selector"], server_labels)
    assert not selects(service["spec"]["selector"], worker_labels)
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], server_labels)
    assert not selects(pdb["spec"]["selector"]["matchLabels"], worker_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert find(render_set(chart, "minimal"), "PodDisruptionBudget") == []


def test_ingress_routes_to_the_service(chart: helm.Chart) -> None:
    docs = render_set(chart, "ingress-hpa")
    ingress = one(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {
        "name": one(docs, "Service")["metadata"]["name"],
        "port": {"name": "http"},
    }
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "ptserve-tls"
    assert find(render_set(chart, "default"), "Ingress") == []


def test_training_data_is_mounted_read_only_where_the_settings_point(chart: helm.Chart) -> None:
    docs = render_set(chart, "production")
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in ("server", "worker"):
        pod = deployment(docs, component)["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "training-data"]
        assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        mount = {
            "name": "training-data",
            "mountPath": env(docs, component)["PTSERVE_DATA_ROOT"],
            "readOnly": True,
        }
        assert mount in pod["containers"][0]["volumeMounts"]
    existing = render_set(chart, "existing-secrets")
    assert find(existing, "PersistentVolumeClaim") == []
    pod = deployment(existing, "worker")["spec"]["template"]["spec"]
    assert {
        "name": "training-data",
        "persistentVolumeClaim": {"claimName": "training-data", "readOnly": True},
    } in pod["volumes"]


# ------------------------------------------------------------------------------------------ autoscaling


def test_keda_scales_the_service_on_the_queue_depth_it_exports(chart: helm.Chart) -> None:
    docs = render_set(chart, "production")
    scaled = one(docs, "ScaledObject", f"{RELEASE}-ptserve-server")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment(docs, "server")["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    service_name = one(docs, "Service")["metadata"]["name"]
    expected = f'sum(ptserve_queue_depth{{namespace="{NAMESPACE}",service="{service_name}"}})'
    assert trigger["metadata"]["query"] == expected
    assert trigger["metadata"]["threshold"] == "32"
    # The metric is one the service exports.
    assert '"ptserve_queue_depth"' in inspect.getsource(service.metrics)
    # The autoscaler owns the replica count: the Deployment does not fight it on upgrade.
    assert "replicas" not in deployment(docs, "server")["spec"]
    assert find(docs, "HorizontalPodAutoscaler") == []
    assert "replicas" in deployment(render_set(chart, "default"), "server")["spec"]


def test_hpa_alternative_reads_the_queue_depth_through_the_custom_metrics_api(chart: helm.Chart) -> None:
    docs = render_set(chart, "ingress-hpa")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment(docs, "server")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "ptserve_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "48"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert find(docs, "ScaledObject") == [] and "replicas" not in deployment(docs, "server")["spec"]


@pytest.mark.parametrize(
    ("name", "kind", "prefix"),
    [
        ("production", "redis-streams", "ptserve"),
        ("sentinel", "redis-sentinel-streams", "ptserve"),
        ("cluster", "redis-cluster-streams", "{ptserve}"),
    ],
)
def test_workers_scale_on_the_job_stream_the_queue_uses(
    chart: helm.Chart, name: str, kind: str, prefix: str
) -> None:
    docs = render_set(chart, name)
    scaled = one(docs, "ScaledObject", f"{RELEASE}-ptserve-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment(docs, "worker")["metadata"]["name"]
    assert "replicas" not in deployment(docs, "worker")["spec"]
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == kind
    # The names prompts/jobs.py uses: {prefix}:jobs:stream and the group "workers".
    assert metadata["stream"] == JobQueue("redis://127.0.0.1:1/0", prefix=prefix).stream
    mode = value_set(name)["worker"]["autoscaling"].get("metric", "streamLength")
    if mode == "streamLength":
        assert "consumerGroup" not in metadata
    else:
        assert metadata["consumerGroup"] == GROUP
    assert mode in metadata
    # KEDA reads the password from the named container's environment.
    password = metadata.get("passwordFromEnv")
    container_name = scaled["spec"]["scaleTargetRef"]["envSourceContainerName"]
    assert container_name == container(docs, "worker")["name"]
    has_secret = bool(value_set(name)["redis"].get("auth", {}).get("existingSecret"))
    assert (password == "REDIS_PASSWORD") is has_secret
    if has_secret:
        assert "secretKeyRef" in env(docs, "worker")["REDIS_PASSWORD"]


def test_worker_scaler_connection_follows_the_redis_values(chart: helm.Chart) -> None:
    url = value_set("production")["redis"]["url"]
    (trigger,) = triggers(render_set(chart, "production"), "worker")
    parts = urlsplit(url)
    assert trigger["metadata"]["address"] == f"{parts.hostname}:{parts.port}"
    assert trigger["metadata"]["databaseIndex"] == parts.path.lstrip("/")
    assert trigger["metadata"]["enableTLS"] == "false"
    tls = render_set(
        chart,
        "default",
        redis={"url": "rediss://cache.internal/4"},
        worker={"autoscaling": {"enabled": True}},
    )
    (trigger,) = triggers(tls, "worker")
    assert trigger["metadata"]["address"] == "cache.internal:6379"
    assert (trigger["metadata"]["databaseIndex"], trigger["metadata"]["enableTLS"]) == ("4", "true")
    (trigger,) = triggers(render_set(chart, "sentinel"), "worker")
    sentinel = value_set("sentinel")["redis"]
    assert trigger["metadata"]["addresses"] == ",".join(sentinel["sentinel"]["hosts"])
    assert trigger["metadata"]["sentinelMaster"] == sentinel["sentinel"]["serviceName"]
    assert trigger["metadata"]["databaseIndex"] == str(sentinel["db"])
    (trigger,) = triggers(render_set(chart, "cluster"), "worker")
    assert trigger["metadata"]["enableTLS"] == "true"
    unix = merged(
        value_set("default"),
        {"redis": {"url": "unix:///run/redis.sock"}, "worker": {"autoscaling": {"enabled": True}}},
    )
    assert "redis:// or rediss://" in render_error(chart, unix)


def test_pending_entries_cannot_scale_workers_from_zero(chart: helm.Chart) -> None:
    values = merged(value_set("cluster"), {"worker": {"autoscaling": {"minReplicas": 0}}})
    assert "never starts a worker from zero" in render_error(chart, values)


@pytest.mark.parametrize(
    "override",
    [
        {"autoscaling": {"enabled": True, "kind": "keda", "minReplicas": 5, "maxReplicas": 3}},
        {"autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 5, "maxReplicas": 3}},
        {"worker": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
    ],
)
def test_autoscalers_refuse_a_minimum_above_the_maximum(chart: helm.Chart, override: dict[str, Any]) -> None:
    assert "minReplicas is above maxReplicas" in render_error(chart, merged(value_set("default"), override))
