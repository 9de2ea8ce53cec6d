"""Kubernetes renders: valid manifests, configs that parse, secrets mounted and never
written into a manifest, drained and spread middles, committed output in sync."""

from __future__ import annotations

import base64
import ipaddress
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from meshproxy import config, topology
from meshproxy.errors import ConfigError
from meshproxy.topology import cluster, kubernetes, secrets
from meshproxy.topology.spec import Spec

ROOT = Path(__file__).resolve().parents[2]
# Passthrough specs only (session mode is rendered for compose).
SPECS = [
    p for p in sorted((ROOT / "topology").glob("*.toml")) if not topology.load(p).session_mode()
]
K8S_VERSION = "1.30"
ENV = {
    cluster.NODE_ENV: "chain-middle-7d4b9c8f6-x2x9z",
    cluster.ADDRESS_ENV: "10.244.1.17",
    kubernetes.MONITOR_ENV: "monitor-password-from-a-secret",
}
POD_KINDS = ("Deployment", "DaemonSet")


def _documents(files: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """Every manifest of a render: (file, object), kustomization.yaml aside."""
    found = []
    for path, text in files.items():
        if path.endswith(".yaml") and path != "kustomization.yaml":
            found += [(path, doc) for doc in yaml.safe_load_all(text)]
    return found


def _kustomization(files: dict[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(files["kustomization.yaml"])
    return document


def _pods(files: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(file, object) of every object with a pod template."""
    return [(path, doc) for path, doc in _documents(files) if doc["kind"] in POD_KINDS]


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def _meshproxy(pod: dict[str, Any]) -> dict[str, Any]:
    """The meshproxy container of a pod: its own, or the sidecar of an application."""
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    (found,) = [c for c in containers if c["name"] == "meshproxy"]
    assert isinstance(found, dict)
    return found


def _generated(kustomization: dict[str, Any], section: str) -> dict[str, dict[str, str]]:
    """A generator's objects: name -> key -> file (``envs`` files keyed by ``envs``)."""
    found: dict[str, dict[str, str]] = {}
    for entry in kustomization[section]:
        keys = dict(item.split("=", 1) for item in entry.get("files", []))
        for env in entry.get("envs", []):
            keys["envs"] = env
        found[entry["name"]] = keys
    return found


def _projected(pod: dict[str, Any]) -> dict[str, Any]:
    (volume,) = [v for v in pod["volumes"] if "projected" in v]
    projected: dict[str, Any] = volume["projected"]
    return projected


def _config_text(files: dict[str, str], pod: dict[str, Any]) -> str:
    """The config a pod runs: its ConfigMap's meshproxy.toml, as kustomize makes it."""
    (source,) = [s["configMap"] for s in _projected(pod)["sources"] if "configMap" in s]
    maps = _generated(_kustomization(files), "configMapGenerator")
    (item,) = source["items"]
    return files[maps[source["name"]][item["key"]]]


def _parse(text: str, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    data = config.expand_environment(tomllib.loads(text), "meshproxy.toml")
    return config.parse(data, kubernetes.CONFIG_PATH, files=False)


def _named_secrets(cfg: config.Config) -> list[str]:
    assert cfg.admin is not None
    assert cfg.gossip is not None
    assert cfg.mesh_tls is not None
    return [
        cfg.admin.token_file,
        cfg.gossip.keys_file,
        cfg.mesh_tls.ca,
        cfg.mesh_tls.cert,
        cfg.mesh_tls.key,
    ]


@pytest.fixture(params=SPECS, ids=lambda p: p.stem)
def spec(request: pytest.FixtureRequest) -> Spec:
    return topology.load(request.param)


def test_every_manifest_validates_against_the_kubernetes_api_schemas(spec: Spec) -> None:
    """Every manifest, and every ConfigMap and Secret the kustomization generates, is a valid
    object of the Kubernetes 1.30 API, strictly: no unknown field anywhere."""
    files = kubernetes.render(spec)
    objects = [doc for _, doc in _documents(files)]
    kustomization = _kustomization(files)
    for name, keys in _generated(kustomization, "configMapGenerator").items():
        data = {key: files[path] for key, path in keys.items()}
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        )
    for entry in kustomization["secretGenerator"]:
        names = [item.split("=", 1)[0] for item in entry.get("files", [])] or ["password"]
        data = {name: base64.b64encode(b"x").decode() for name in names}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": entry["name"]}}
        objects.append({**secret, "type": entry.get("type", "Opaque"), "data": data})
    kinds = {doc["kind"] for doc in objects}
    assert kinds >= {"Deployment", "DaemonSet", "PodDisruptionBudget", "Service", "EndpointSlice"}
    for doc in objects:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization
    assert all("namespace" not in doc["metadata"] for doc in objects)
    listed = sorted(kustomization["resources"])
    assert set(listed) <= set(files)
    daemonsets = [p for p in files if p.endswith("-daemonset.yaml")]
    assert sorted(p for p in files if p.endswith(".yaml") and p != "kustomization.yaml") == sorted(
        {*listed, *daemonsets}
    )


def test_workload_configs_parse_with_dns_discovery(
    spec: Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap of each workload holds a valid meshproxy config once the pod's
    environment is filled in: the pod's name and address, gossip found through the headless
    Service by DNS, the monitor password from the environment, backends by Service name."""
    files = kubernetes.render(spec)
    maps = _generated(_kustomization(files), "configMapGenerator")
    for workload in cluster.workloads(spec):
        path = maps[kubernetes.config_map(spec, workload)][cluster.CONFIG_FILE]
        cfg = _parse(files[path], monkeypatch)
        assert (cfg.node.name, cfg.node.role) == (ENV[cluster.NODE_ENV], workload.role)
        assert cfg.gossip is not None
        assert cfg.gossip.discovery == "dns"
        assert cfg.gossip.dns_names == (kubernetes.gossip_service(spec),)
        assert str(cfg.gossip.advertise) == f"{ENV[cluster.ADDRESS_ENV]}:7946"
        assert cfg.mesh_tls is not None
        assert cfg.mesh_tls.name == workload.name
        if workload.role == "middle":
            assert str(cfg.node.mesh_advertise) == f"{ENV[cluster.ADDRESS_ENV]}:7001"
        for pool in cfg.pool:
            assert pool.check.password == ENV[kubernetes.MONITOR_ENV]
            assert [str(s.address) for s in pool.servers] == [
                f"{b}:3306" for b in next(s for s in spec.services if s.name == pool.name).backends
            ]


def test_no_secret_value_is_in_any_rendered_file(spec: Spec, tmp_path: Path) -> None:
    """No token, key, certificate or password that rendering made in secrets/ appears in a
    rendered file: the Secrets come from secretGenerator, and no manifest is a Secret."""
    written = kubernetes.write(spec, tmp_path)
    made = [p for p in (tmp_path / secrets.DIR).iterdir() if p.name != ".gitignore"]
    assert {p.name for p in made} >= {"ca.key", "admin.token", "gossip.keys", "monitor.env"}
    values: list[str] = []  # each token, key and password, and each line of a PEM body
    for path in made:
        for line in path.read_text().splitlines():
            if path.name == kubernetes.MONITOR_FILE:
                line = "" if line.startswith("#") else line.partition("=")[2]
            if len(line.strip()) >= 16 and not line.startswith("-----"):
                values.append(line.strip())
    assert len(values) >= len(made)
    texts = [p.read_text() for p in written]
    assert len(texts) == len(kubernetes.render(spec))
    for value in values:
        assert not any(value in text for text in texts), "a secret was rendered into a file"
    assert all(doc["kind"] != "Secret" for _, doc in _documents(kubernetes.render(spec)))


def test_every_secret_a_config_names_is_mounted_and_generated(
    spec: Spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pod mounts, read-only, exactly the secrets its config names (the CA, its
    workload's certificate and key, the gossip keys, the admin token), each from a Secret
    key that the kustomization's secretGenerator makes from a file write() made; a monitor
    password in the config comes from a generated Secret too; the CA key is never used."""
    kubernetes.write(spec, tmp_path)
    files = kubernetes.render(spec)
    kustomization = _kustomization(files)
    generated = _generated(kustomization, "secretGenerator")
    assert not any("ca.key" in f for keys in generated.values() for f in keys.values())
    for path, obj in _pods(files):
        pod = _pod(obj)
        container = _meshproxy(pod)
        text = _config_text(files, pod)
        cfg = _parse(text, monkeypatch)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "meshproxy"]
        assert mount["readOnly"] is True
        projected = _projected(pod)
        assert projected["defaultMode"] == 0o440
        mounted = {
            f"{mount['mountPath']}/{item['path']}": (source["secret"]["name"], item["key"])
            for source in projected["sources"]
            if "secret" in source
            for item in source["secret"]["items"]
        }
        assert sorted(mounted) == sorted(_named_secrets(cfg)), path
        for secret, key in mounted.values():
            assert (tmp_path / generated[secret][key]).is_file(), (secret, key)
        env = {e["name"]: e for e in container["env"]}
        assert env[cluster.NODE_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env[cluster.ADDRESS_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        if f"${{{kubernetes.MONITOR_ENV}}}" in text:
            ref = env[kubernetes.MONITOR_ENV]["valueFrom"]["secretKeyRef"]
            env_file = tmp_path / generated[ref["name"]]["envs"]
            keys = [
                line.partition("=")[0]
                for line in env_file.read_text().splitlines()
                if line and not line.startswith("#")
            ]
            assert keys == [ref["key"]]
        else:
            assert kubernetes.MONITOR_ENV not in env


def test_middles_drain_one_at_a_time_and_spread_over_nodes(spec: Spec) -> None:
    """Each tier is a Deployment of its middles that probes /ready and /live on the admin
    port, drains in preStop within a grace period longer than node.drain_timeout_s (long
    enough for the preStop wait and the node's own drain after it), surges during rollouts,
    spreads over nodes, and has a budget of one unavailable middle."""
    files = kubernetes.render(spec)
    documents = _documents(files)
    replicas = {r["name"]: r["count"] for r in _kustomization(files)["replicas"]}
    drain = config.NodeConfig.drain_timeout_s
    for workload in (w for w in cluster.workloads(spec) if w.role == "middle"):
        name = kubernetes.workload_object(spec, workload)
        (deployment,) = [
            d for _, d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == name
        ]
        (budget,) = [
            d
            for _, d in documents
            if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == name
        ]
        assert deployment["spec"]["replicas"] == replicas[name] == len(workload.nodes) >= 1
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {
            "maxSurge": 1,
            "maxUnavailable": 0,
        }
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        pod = _pod(deployment)
        container = _meshproxy(pod)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
            get = container[probe]["httpGet"]
            assert (get["path"], ports[get["port"]]) == (path, 6032)
        assert container["lifecycle"]["preStop"]["exec"]["command"] == [
            "meshproxy",
            "ctl",
            "-c",
            "/etc/meshproxy/meshproxy.toml",
            "drain",
            "--wait-s",
            f"{drain:g}",
        ]
        assert container["command"] == ["meshproxy", "run", "-c", "/etc/meshproxy/meshproxy.toml"]
        # The preStop wait, then the node's own drain after SIGTERM, then its goodbye.
        assert pod["terminationGracePeriodSeconds"] >= 2 * drain + 10 > drain
        assert {p["containerPort"] for p in container["ports"]} >= {7001, 7946, 6032}
        assert {(p["containerPort"], p["protocol"]) for p in container["ports"]} >= {
            (7946, "UDP"),
            (7946, "TCP"),
        }
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]["memory"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["runAsNonRoot"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # noqa: S108
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"] == selector


def test_gossip_service_lists_every_meshproxy_pod_ready_or_not(spec: Spec) -> None:
    """One headless Service with the name the configs resolve, publishing not-ready pods,
    selects every pod that runs a meshproxy node (middles, sidecars, DaemonSet edges) on the
    gossip port over UDP and TCP."""
    files = kubernetes.render(spec)
    services = {d["metadata"]["name"]: d for _, d in _documents(files) if d["kind"] == "Service"}
    gossip = services[kubernetes.gossip_service(spec)]["spec"]
    assert gossip["clusterIP"] == "None"
    assert gossip["publishNotReadyAddresses"] is True
    assert {(p["port"], p["protocol"]) for p in gossip["ports"]} == {(7946, "UDP"), (7946, "TCP")}
    pods = _pods(files)
    assert pods
    for _, obj in pods:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert gossip["selector"].items() <= labels.items()
        assert _meshproxy(_pod(obj))


def test_backends_are_selectorless_services_with_example_addresses(spec: Spec) -> None:
    """Each backend of the spec is a Service of its own name on port 3306 without a
    selector, and an EndpointSlice of that Service holds an example address (RFC 5737)."""
    files = kubernetes.render(spec)
    documents = [d for _, d in _documents(files)]
    example = ipaddress.ip_network("192.0.2.0/24")
    for backend in spec.backends:
        (service,) = [
            d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == backend.name
        ]
        assert "selector" not in service["spec"]
        assert [p["port"] for p in service["spec"]["ports"]] == [3306]
        (endpoints,) = [
            d
            for d in documents
            if d["kind"] == "EndpointSlice"
            and d["metadata"]["labels"]["kubernetes.io/service-name"] == backend.name
        ]
        assert [p["name"] for p in endpoints["ports"]] == [
            p["name"] for p in service["spec"]["ports"]
        ]
        (address,) = endpoints["endpoints"][0]["addresses"]
        assert ipaddress.ip_address(address) in example
        assert "REPLACE" in files["backends.yaml"]


def test_edges_run_as_sidecars_or_as_a_node_local_daemonset(spec: Spec) -> None:
    """An application's pods carry its edge as a native sidecar that it reaches on
    127.0.0.1; the alternative DaemonSet of the edge (in its own file, not a resource unless
    the edge has no application) sits behind a Service with internalTrafficPolicy Local that
    selects the DaemonSet's pods only."""
    files = kubernetes.render(spec)
    resources = _kustomization(files)["resources"]
    for workload in (w for w in cluster.workloads(spec) if w.role == "edge"):
        apps = [n.name for n in spec.nodes if n.role == "app" and n.edge == workload.name]
        port = spec.services[0].port
        for app in apps:
            (deployment,) = yaml.safe_load_all(files[kubernetes.app_file(app)])
            pod = _pod(deployment)
            sidecar = _meshproxy(pod)
            assert sidecar in pod["initContainers"]
            assert sidecar["restartPolicy"] == "Always"
            assert sidecar["startupProbe"]["httpGet"]["path"] == "/ready"
            (application,) = pod["containers"]
            env = {e["name"]: e["value"] for e in application["env"]}
            assert (env["MYSQL_HOST"], env["MYSQL_PORT"]) == ("127.0.0.1", str(port))
            assert kubernetes.app_file(app) in resources
        daemonset, service = yaml.safe_load_all(files[kubernetes.daemonset_file(workload)])
        assert (daemonset["kind"], service["kind"]) == ("DaemonSet", "Service")
        assert (kubernetes.daemonset_file(workload) in resources) == (not apps)
        assert service["spec"]["internalTrafficPolicy"] == "Local"
        assert [p["port"] for p in service["spec"]["ports"]] == [s.port for s in spec.services]
        selector = service["spec"]["selector"]
        assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
        for app in apps:
            (deployment,) = yaml.safe_load_all(files[kubernetes.app_file(app)])
            assert (
                not selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
            )


def test_objects_of_one_kind_never_share_a_name() -> None:
    """A spec whose names would give two objects of one kind the same name (here an edge
    called like the gossip Service) is refused with the clash."""
    data = tomllib.loads((ROOT / "topology" / "chain.toml").read_text())
    for node in data["node"]:
        if node["name"] == "p1":
            node["name"] = "gossip"
        if node.get("edge") == "p1":
            node["edge"] = "gossip"
    spec = topology.parse(data, "chain.toml")
    with pytest.raises(ConfigError, match="'chain-gossip'"):
        kubernetes.render(spec)


def test_kustomize_builds_the_render_with_every_generated_name_in_place(
    spec: Spec, tmp_path: Path
) -> None:
    """Where kubectl is installed, `kubectl kustomize` builds a written render offline, every
    reference to a generated ConfigMap or Secret gets its hashed name, and each object it
    builds is valid Kubernetes 1.30."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    kubernetes.write(spec, tmp_path)
    built = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    objects = list(yaml.safe_load_all(built))
    names = {o["metadata"]["name"] for o in objects if o["kind"] in ("ConfigMap", "Secret")}
    kustomization = _kustomization(kubernetes.render(spec))
    plain = [
        e["name"] for e in kustomization["configMapGenerator"] + kustomization["secretGenerator"]
    ]
    assert len(names) == len(plain)
    for name in plain:
        assert any(n.startswith(f"{name}-") for n in names)
    for obj in objects:
        if obj["kind"] in POD_KINDS:
            text = yaml.safe_dump(obj["spec"]["template"])
            for name in plain:
                assert f"name: {name}\n" not in text, f"{name} left unhashed"
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
    images = {
        c["image"]
        for o in objects
        if o["kind"] in POD_KINDS
        for c in [*_pod(o).get("initContainers", []), *_pod(o)["containers"]]
    }
    assert images == {"meshproxy:local"}


def test_rendering_again_keeps_the_secrets(tmp_path: Path) -> None:
    """A second render into the same folder keeps every secret, the monitor password too."""
    spec = topology.load(ROOT / "topology" / "chain.toml")
    kubernetes.write(spec, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / secrets.DIR).iterdir()}
    kubernetes.write(spec, tmp_path)
    after = {p.name: p.read_bytes() for p in (tmp_path / secrets.DIR).iterdir()}
    assert before == after
