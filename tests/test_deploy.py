"""Deployment files, checked offline: there is no Docker engine, kubectl or kustomize here, so the manifests are
rendered the way kustomize would (resources, strategic-merge patches by kind and name, images, namespace),
validated against the Kubernetes schemas that kubernetes-validate ships, and checked for what the runbook
promises: probes, draining, security, and settings the gateway accepts."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from prometheus_client import REGISTRY
from pydantic import ValidationError
from yamllint import linter  # type: ignore[import-untyped]  # ships no type information
from yamllint.config import YamlLintConfig  # type: ignore[import-untyped]

from app.cli import build_parser
from app.config import Settings
from app.mcp_server import MESSAGE_PATH, SSE_PATH
from app.metrics import HTTP_REQUESTS
from app.sealing import new_master_key, parse_master_keys

Resource = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("trial", "production")
ENV_EXAMPLE = DEPLOY / "gateway.env.example"
SECRET_TEMPLATE = KUBERNETES / "base" / "secret.example.yaml"
# A version whose schemas ship inside kubernetes-validate, so validation needs no network.
KUBERNETES_VERSION = "1.33"
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
CLUSTER_SCOPED = {"Namespace"}
GATEWAY = "kling-gateway"
POD_TMP = "/tmp"  # noqa: S108 - the gateway pod's emptyDir, the one writable path on a read-only root
SETTING = re.compile(r"\bKGW_[A-Z0-9_]+\b")


# --- reading -------------------------------------------------------------------------------------------


def documents(path: Path) -> list[Resource]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def one_document(path: Path) -> Resource:
    (document,) = documents(path)
    return document


def our_yaml_files() -> list[Path]:
    """The YAML of this deployment; deploy/nginx/ belongs to the reverse-proxy setup and is linted there."""
    files = [ROOT / "docker-compose.yml", ROOT / ".yamllint"]
    files += [p for p in DEPLOY.rglob("*.y*ml") if "nginx" not in p.relative_to(DEPLOY).parts]
    return sorted(files)


def setting_names() -> set[str]:
    return {f"KGW_{name.upper()}" for name in Settings.model_fields}


def settings_from(variables: dict[str, str]) -> Settings:
    """Settings as the gateway would read them from these KGW_* variables (and from nothing else: validating
    the mapping skips the settings sources, so this process's environment cannot change the outcome)."""
    return Settings.model_validate({name.removeprefix("KGW_").lower(): value for name, value in variables.items()})


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


# --- a small kustomize ---------------------------------------------------------------------------------


def strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge key by key; lists of named items (containers, env, volumes, ports) merge by name, as
    Kubernetes' strategic merge does for them; any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(_named(item) for item in base + patch):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = strategic_merge(by_name[item["name"]], item) if item["name"] in by_name else item
        return list(by_name.values())
    return patch


def _named(item: object) -> bool:
    return isinstance(item, dict) and "name" in item


def render(directory: Path) -> list[Resource]:
    """What `kustomize build directory` gives, for the features our kustomizations use (others are refused)."""
    kustomization = one_document(directory / "kustomization.yaml")
    assert set(kustomization) <= KUSTOMIZATION_FIELDS, f"{directory}: this renderer does not know these fields"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        resources += render(target) if target.is_dir() else documents(target)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: patches are files whose kind and name pick the target"
        patch = one_document(directory / entry["path"])
        (index,) = [i for i, r in enumerate(resources) if identity(r) == identity(patch)]
        resources[index] = strategic_merge(resources[index], patch)
    for image in kustomization.get("images", []):
        for container in containers_of(resources):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    identities = [identity(r) for r in resources]
    assert len(identities) == len(set(identities)), f"{directory}: a resource is defined twice"
    return resources


def identity(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def containers_of(resources: list[Resource]) -> Iterator[Resource]:
    for resource in resources:
        if resource["kind"] in ("Deployment", "StatefulSet"):
            yield from resource["spec"]["template"]["spec"]["containers"]


def find(resources: list[Resource], kind: str, name: str = GATEWAY) -> Resource:
    (resource,) = [r for r in resources if identity(r) == (kind, name)]
    return resource


def gateway_container(resources: list[Resource]) -> Resource:
    containers: list[Resource] = find(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def config(resources: list[Resource]) -> dict[str, str]:
    data: dict[str, str] = find(resources, "ConfigMap", "kling-gateway-config")["data"]
    return data


def max_wait_seconds(variables: dict[str, str]) -> int:
    return settings_from({"KGW_MAX_WAIT_SECONDS": variables["KGW_MAX_WAIT_SECONDS"]}).max_wait_seconds


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"expected a duration in seconds, got {duration!r}"
    return int(match.group(1))


# --- YAML and schemas ----------------------------------------------------------------------------------


def test_every_yaml_file_of_the_deployment_passes_yamllint() -> None:
    config_ = YamlLintConfig(file=str(ROOT / ".yamllint"))
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}: {problem.message}"
        for path in our_yaml_files()
        for problem in linter.run(path.read_text(), config_, str(path))
    ]
    assert problems == []


def test_the_pinned_kubernetes_version_has_schemas_in_the_package() -> None:
    assert KUBERNETES_VERSION in {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{name}" for name in OVERLAYS)])
def test_rendered_manifests_are_valid_kubernetes_objects(directory: str) -> None:
    for resource in render(KUBERNETES / directory):
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{directory}: {resource['kind']}/{resource['metadata']['name']}: {exc.message}")


def test_every_kustomization_lists_files_that_exist_and_every_manifest_is_listed() -> None:
    for kustomization_file in KUBERNETES.rglob("kustomization.yaml"):
        directory = kustomization_file.parent
        kustomization = one_document(kustomization_file)
        listed = [*kustomization.get("resources", []), *(p["path"] for p in kustomization.get("patches", []))]
        assert [entry for entry in listed if not (directory / entry).exists()] == []
        local = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATE.name}
        assert local - set(listed) == set(), f"{directory} holds manifests its kustomization leaves out"
        # `kubectl apply -k` must never overwrite the real Secret with the template's values.
        assert SECRET_TEMPLATE.name not in listed


# --- the overlays, rendered ----------------------------------------------------------------------------


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[Resource]:
    return render(KUBERNETES / "overlays" / request.param)


def test_every_resource_lands_in_the_overlay_namespace(rendered: list[Resource]) -> None:
    (namespace,) = [r["metadata"]["name"] for r in rendered if r["kind"] == "Namespace"]
    assert {r["metadata"]["namespace"] for r in rendered if r["kind"] != "Namespace"} == {namespace}


def test_selectors_and_references_name_what_the_overlay_defines(rendered: list[Resource]) -> None:
    deployment = find(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        *(s["spec"]["selector"] for s in rendered if s["kind"] == "Service" and s["metadata"]["name"] != "kling-redis"),
        find(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        *(p["spec"]["podSelector"]["matchLabels"] for p in rendered if p["kind"] == "NetworkPolicy"
          and p["metadata"]["labels"]["app.kubernetes.io/name"] == GATEWAY),
    ]  # fmt: skip
    assert all(selector.items() <= pod_labels.items() for selector in selectors)
    assert find(rendered, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == GATEWAY
    pod = deployment["spec"]["template"]["spec"]
    assert find(rendered, "ServiceAccount", pod["serviceAccountName"])
    references = gateway_container(rendered)["envFrom"]
    assert find(rendered, "ConfigMap", references[0]["configMapRef"]["name"])
    assert references[1]["secretRef"]["name"] == one_document(SECRET_TEMPLATE)["metadata"]["name"]
    container_ports = {port["name"] for port in gateway_container(rendered)["ports"]}
    for ingress in (r for r in rendered if r["kind"] == "Ingress"):
        for path in (path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]):
            service = find(rendered, "Service", path["backend"]["service"]["name"])
            ports = {port["name"]: port["targetPort"] for port in service["spec"]["ports"]}
            assert ports[path["backend"]["service"]["port"]["name"]] in container_ports


def test_legacy_sse_sessions_are_pinned_to_one_replica_and_nothing_else_is(rendered: list[Resource]) -> None:
    ingresses = {r["metadata"]["name"]: r for r in rendered if r["kind"] == "Ingress"}
    hashing = "nginx.ingress.kubernetes.io/upstream-hash-by"
    pinned = {name for name, ingress in ingresses.items() if hashing in ingress["metadata"]["annotations"]}
    assert pinned == {"kling-gateway-legacy-sse"}
    paths = {
        p["path"] for rule in ingresses["kling-gateway-legacy-sse"]["spec"]["rules"] for p in rule["http"]["paths"]
    }
    assert paths == {SSE_PATH, MESSAGE_PATH}
    # Its own Service: ingress-nginx keeps one balancing setting per backend Service.
    backends = {
        name: {p["backend"]["service"]["name"] for rule in i["spec"]["rules"] for p in rule["http"]["paths"]}
        for name, i in ingresses.items()
    }
    assert backends["kling-gateway-legacy-sse"].isdisjoint(backends[GATEWAY])


def test_pods_run_unprivileged_on_a_read_only_root_with_no_api_token(rendered: list[Resource]) -> None:
    for workload in (r for r in rendered if r["kind"] in ("Deployment", "StatefulSet")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]
    pod = find(rendered, "Deployment")["spec"]["template"]["spec"]
    (tmp,) = [m for m in gateway_container(rendered)["volumeMounts"] if m["mountPath"] == POD_TMP]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def test_probes_and_shutdown_let_the_longest_wait_finish(rendered: list[Resource]) -> None:
    container = gateway_container(rendered)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    # uvicorn waits KGW_MAX_WAIT_SECONDS + 5 s for open requests (app/cli.py), after the preStop sleep.
    needed = int(command[1]) + max_wait_seconds(config(rendered)) + 5
    assert find(rendered, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed
    replicas = find(rendered, "Deployment")["spec"]["replicas"]
    autoscaler = find(rendered, "HorizontalPodAutoscaler")["spec"]
    assert autoscaler["minReplicas"] == replicas >= 2
    assert int(config(rendered)["KGW_REPLICAS_HINT"]) == replicas
    assert find(rendered, "PodDisruptionBudget")["spec"]["maxUnavailable"] < replicas


def test_the_ingresses_stream_events_and_outwait_the_longest_wait(rendered: list[Resource]) -> None:
    prefix = "nginx.ingress.kubernetes.io/"
    for ingress in (r for r in rendered if r["kind"] == "Ingress"):
        annotations = ingress["metadata"]["annotations"]
        assert annotations[f"{prefix}proxy-buffering"] == "off"
        assert int(annotations[f"{prefix}proxy-read-timeout"]) > max_wait_seconds(config(rendered))
        body_limit = annotations[f"{prefix}proxy-body-size"]
        assert body_limit.endswith("m")
        assert int(body_limit[:-1]) * 1024 * 1024 >= Settings.model_fields["max_body_bytes"].default
        hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        assert hosts == {urlsplit(config(rendered)["KGW_PUBLIC_URL"]).hostname}
        assert hosts <= {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}


def test_the_config_map_and_a_filled_in_secret_make_valid_settings(rendered: list[Resource]) -> None:
    secret = {
        "KGW_KEY_PEPPER": "pepper-0123456789abcdef",
        "KGW_MASTER_KEY": new_master_key(),
        "KGW_ADMIN_TOKEN": "admin-0123456789abcdef",
    }
    variables = config(rendered)
    assert set(variables) <= setting_names()
    if "KGW_REDIS_URL" not in variables:  # production: the URL carries a password, so it is in the Secret
        secret["KGW_REDIS_URL"] = "rediss://:password@redis.example.internal:6380/0"
    settings = settings_from({**variables, **secret})
    assert settings.redis_url is not None
    assert settings.key_environment is not None


def test_the_trial_redis_is_the_one_the_gateway_is_pointed_at() -> None:
    rendered = render(KUBERNETES / "overlays" / "trial")
    url = urlsplit(config(rendered)["KGW_REDIS_URL"])
    service = find(rendered, "Service", str(url.hostname))
    assert url.port in {port["port"] for port in service["spec"]["ports"]}
    statefulset = find(rendered, "StatefulSet", "kling-redis")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_the_secret_template_names_only_real_settings_and_cannot_run_unedited() -> None:
    secret = one_document(SECRET_TEMPLATE)
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    assert set(SETTING.findall(SECRET_TEMPLATE.read_text())) <= setting_names()
    values: dict[str, str] = secret["stringData"]
    with pytest.raises(ValidationError):
        settings_from({name: value for name, value in values.items() if name != "KGW_MASTER_KEY"})
    with pytest.raises(ValueError, match="Fernet"):
        parse_master_keys(values["KGW_MASTER_KEY"])


# --- the image -----------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                                            if not line.lstrip().startswith("#")))  # fmt: skip
    pairs = (line.strip().split(None, 1) for line in text.splitlines() if line.strip())
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in pairs]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    start = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[start:]


def exec_form(arguments: str) -> list[str]:
    parsed = yaml.safe_load(arguments)  # a JSON array is YAML too
    assert isinstance(parsed, list), f"expected the exec (JSON array) form: {arguments}"
    return [str(part) for part in parsed]


def test_the_image_is_multi_stage_on_slim_python_3_11() -> None:
    instructions = dockerfile()
    (base,) = [args for name, args in instructions if name == "ARG" and args.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)
    assert len([name for name, _ in instructions if name == "FROM"]) >= 2
    assert any(name == "COPY" and args.startswith("--from=build") for name, args in final_stage())


def test_dependencies_are_installed_in_a_layer_before_the_code_is_copied() -> None:
    instructions = dockerfile()
    copies = [(i, args.split()) for i, (name, args) in enumerate(instructions) if name == "COPY"]
    first_code = min(i for i, args in copies if args[0] == "app")
    dependencies = [i for i, (name, args) in enumerate(instructions) if name == "RUN" and "requirements" in args]
    assert dependencies
    assert max(dependencies) < first_code
    assert [args[0] for i, args in copies if i < min(dependencies)] == ["pyproject.toml"]


def test_the_image_runs_serve_as_a_non_root_user_with_a_health_check() -> None:
    stage = final_stage()
    (user,) = [args for name, args in stage if name == "USER"]
    assert int(user.split(":")[0]) != 0, "a numeric uid, so runAsNonRoot can verify it"
    (check,) = [args for name, args in stage if name == "HEALTHCHECK"]
    command = exec_form(check.split("CMD", 1)[1])
    assert command[0] == "python"
    assert "/healthz" in command[-1]
    (cmd,) = [exec_form(args) for name, args in stage if name == "CMD"]
    assert cmd[:2] == ["kling-gateway", "serve"]
    serve = build_parser().parse_args(cmd[1:])
    (exposed,) = [int(args) for name, args in stage if name == "EXPOSE"]
    assert serve.port == exposed
    assert f":{exposed}/healthz" in command[-1]
    # Kubernetes runs the same command on the same port, as the same user.
    for overlay in OVERLAYS:
        rendered = render(KUBERNETES / "overlays" / overlay)
        container = gateway_container(rendered)
        assert container["args"] == cmd
        assert container["ports"][0]["containerPort"] == exposed
        assert find(rendered, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
            user.split(":")[0]
        )


def test_what_the_image_copies_is_in_the_build_context() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]  # fmt: skip
    sources = [args.split()[0] for name, args in dockerfile() if name == "COPY" and not args.startswith("--from")]
    for source in sources:
        assert (ROOT / source).exists()
        assert not any(Path(source).match(pattern) for pattern in ignored), f"{source} is in .dockerignore"
    assert {"tests", ".venv", ".git", "*.env"} <= set(ignored)


# --- docker compose ------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    services: dict[str, Any] = one_document(ROOT / "docker-compose.yml")["services"]
    return services


def test_compose_redis_persists_and_reports_health() -> None:
    redis = compose()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_compose_gateway_is_built_here_configured_by_the_env_example_and_waits_for_redis() -> None:
    gateway = compose()["gateway"]
    assert gateway["build"] == "."
    assert "profiles" not in gateway
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    (env_file_entry,) = gateway["env_file"]
    default = re.fullmatch(r"\$\{GATEWAY_ENV_FILE:-(.+)\}", env_file_entry)
    assert default
    assert ROOT / default.group(1) == ENV_EXAMPLE
    assert seconds(gateway["stop_grace_period"]) > max_wait_seconds(env_file(ENV_EXAMPLE)) + 5
    assert all(port.startswith("127.0.0.1:") for port in gateway["ports"]), "trial secrets stay on this machine"


def test_the_sim_profile_runs_the_simulator_where_the_gateway_looks_for_kling() -> None:
    simulator = compose()["simulator"]
    assert simulator["profiles"] == ["sim"]
    assert simulator["network_mode"] == "service:gateway"
    command = simulator["command"]
    arguments = build_parser().parse_args(command[1:])
    assert command[:2] == ["kling-gateway", "simulator"]
    kling = urlsplit(env_file(ENV_EXAMPLE)["KGW_KLING_BASE_URL"])
    assert (kling.hostname, kling.port) == ("127.0.0.1", arguments.port)
    assert arguments.host == "0.0.0.0"  # noqa: S104 - published to the host, for the image downloads
    assert any(port.endswith(f":{arguments.port}") for port in compose()["gateway"]["ports"])
    # The image's own health check probes the gateway; the simulator's must probe the simulator.
    assert f":{arguments.port}/" in simulator["healthcheck"]["test"][-1]


def test_the_env_example_runs_a_gateway_on_redis_with_settings_that_exist() -> None:
    assert set(SETTING.findall(ENV_EXAMPLE.read_text())) <= setting_names()
    settings = settings_from(env_file(ENV_EXAMPLE))
    assert settings.redis_url is not None
    assert settings.key_pepper is not None
    assert settings.master_key is not None
    assert parse_master_keys(settings.master_key.get_secret_value())


# --- the runbook ---------------------------------------------------------------------------------------


def test_every_cli_command_in_the_runbook_is_one_the_cli_accepts() -> None:
    verbs = "|".join(
        re.escape(verb) for verb in ("serve", "demo", "simulator", "tenants", "keys", "master-key", "generate")
    )
    # In code blocks and in `inline code`: a command runs to the end of its line, its code span or the shell
    # construct around it.
    commands = re.findall(
        rf"(?:^|[\s(`])kling-gateway ((?:{verbs})\b[^\n`#)|;&]*)", (DEPLOY / "README.md").read_text(), re.M
    )
    assert len(commands) >= 5
    for command in commands:
        words = ["X" if word.startswith("$") else word for word in shlex.split(command)]
        build_parser().parse_args(words)


def test_every_metric_the_runbook_alerts_on_is_one_the_gateway_exports() -> None:
    # app.metrics defines the gateway's families at import, in prometheus-client's default registry.
    assert {family.name for family in HTTP_REQUESTS.describe()} <= {family.name for family in REGISTRY.collect()}
    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    exported = {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes}
    named = set(re.findall(r"\bkgw_[a-z]+(?:_[a-z]+)*\b", (DEPLOY / "README.md").read_text()))
    assert len(named) >= 8
    assert named <= exported


def test_the_ingress_routes_public_paths_only_never_metrics_or_probes() -> None:
    ingress = find(render(DEPLOY / "kubernetes" / "base"), "Ingress")
    paths = [path["path"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert "/mcp" in paths
    assert "/generate" in paths
    assert not any(path in ("/", "/metrics", "/healthz", "/readyz") for path in paths)
