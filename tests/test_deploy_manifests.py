"""Static checks of docker-compose.yml, deploy/kuberay/*.yaml and deploy/Dockerfile.

Fast and offline: the files are parsed and checked against each other and against the code they
run. ``shardopt serve`` and ``shardopt health`` command lines are parsed with shardopt's own
argparse parser and ``ray start`` command lines (KubeRay's ``rayStartParams`` included) with
Ray's own click command, so a misspelt flag fails here rather than in a container. Running the
compose services as processes is tests/test_deploy.py's job; ``docker compose config`` runs
here only where a compose binary is installed.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from shardopt.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
KUBERAY_DIR = ROOT / "deploy" / "kuberay"
KUBERAY_FILES = ("raycluster.yaml", "raycluster-gpu.yaml", "gateway.yaml", "secrets.example.yaml")

RAY_SERVICES = ("ray-head", "ray-worker-1", "ray-worker-2", "gateway")
SERVE_PORT = 50051

# `pip install ... .` or `pip install ... ".[extra]"`: a RUN that installs shardopt itself.
INSTALLS_SHARDOPT = re.compile(r"""pip install\b[^&;]*\s["']?\.(\[[\w,-]+\])?["']?(\s|$)""")
# Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}.
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
BARE_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")

TOP_LEVEL_KEYS = ["name", "services", "volumes", "secrets", "networks", "configs"]
# The Compose Specification's service attributes.
SERVICE_KEYS = """
annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs
container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime
cpu_shares cpus cpuset credential_spec depends_on deploy develop device_cgroup_rules devices
dns dns_opt dns_search domainname entrypoint env_file environment expose extends
external_links extra_hosts gpus group_add healthcheck hostname image init ipc isolation labels
links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit network_mode
networks oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_stop
privileged profiles provider pull_policy read_only restart runtime scale secrets security_opt
shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits
use_api_socket user userns_mode uts volumes volumes_from working_dir
""".split()

STRING_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
COMPOSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "services": {
            "type": "object",
            "required": list(RAY_SERVICES),
            "additionalProperties": {"$ref": "#/$defs/service"},
        },
        "volumes": {"type": "object"},
        "secrets": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "file": {"type": "string"},
                    "environment": {"type": "string"},
                    "external": {"type": "boolean"},
                    "name": {"type": "string"},
                },
                "additionalProperties": False,
                "minProperties": 1,
            },
        },
        "networks": {"type": "object"},
        "configs": {"type": "object"},
    },
    "patternProperties": {"^x-": {}},
    "additionalProperties": False,
    "required": ["services"],
    "$defs": {
        "service": {
            "type": "object",
            "properties": {
                "command": STRING_OR_LIST,
                "image": {"type": "string"},
                "build": {
                    "type": "object",
                    "properties": {
                        "context": {"type": "string"},
                        "dockerfile": {"type": "string"},
                        "args": {"type": ["object", "array"]},
                    },
                    "required": ["context", "dockerfile"],
                },
                "shm_size": {"type": ["string", "integer"]},
                "environment": {"type": ["object", "array"]},
                "depends_on": {"type": ["object", "array"]},
                "ports": {"type": "array", "items": {"type": ["string", "integer", "object"]}},
                "volumes": {"type": "array", "items": {"type": ["string", "object"]}},
                "secrets": {"type": "array", "items": {"type": ["string", "object"]}},
                "healthcheck": {
                    "type": "object",
                    "properties": {
                        "test": STRING_OR_LIST,
                        "interval": {"type": "string"},
                        "timeout": {"type": "string"},
                        "retries": {"type": "integer", "minimum": 1},
                        "start_period": {"type": "string"},
                        "start_interval": {"type": "string"},
                        "disable": {"type": "boolean"},
                    },
                    "required": ["test"],
                    "additionalProperties": False,
                },
                "stop_grace_period": {"type": "string"},
                "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
            },
            "propertyNames": {"anyOf": [{"enum": SERVICE_KEYS}, {"pattern": "^x-"}]},
            "required": ["command", "image", "build", "shm_size"],
        }
    },
}


# ----- helpers ------------------------------------------------------------------------------


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def with_defaults(value: Any) -> Any:
    """Compose interpolation with every variable at its default (``${VAR:-default}``)."""
    if isinstance(value, list):
        return [with_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: with_defaults(v) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, op, arg = match.groups()
        if op in (":-", "-"):
            return arg
        return f"<{name}>"  # a required value: a placeholder that no default can equal

    return VARIABLE.sub(replace, value).replace("$$", "$")


def env_example_names() -> tuple[set[str], set[str]]:
    """The variables deploy/env.example sets, and those it lists in comments (optional knobs)."""
    assigned, commented = set(), set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=", line):
            assigned.add(match[1])
        elif match := re.match(r"^\s*#\s*([A-Za-z_][A-Za-z0-9_]*)=", line):
            commented.add(match[1])
    return assigned, commented


def environment_of(container_env: Any) -> dict[str, Any]:
    """A compose service's environment as a dict (it may be a mapping or a KEY=VALUE list)."""
    if isinstance(container_env, dict):
        return dict(container_env)
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in container_env)


def split_shell(command: Any) -> list[list[str]]:
    """The commands a container runs: ``sh -c "a && exec b"`` gives [[a...], [b...]]."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] in (["sh", "-c"], ["bash", "-c"], ["/bin/sh", "-c"], ["/bin/bash", "-c"]):
        parts = re.split(r"&&|;", command[2])
        words = [shlex.split(part) for part in parts if part.strip()]
        return [w[1:] if w[:1] == ["exec"] else w for w in words]
    return [list(command)]


def serve_args(command: Any) -> dict[str, Any]:
    """The ``shardopt serve`` options of a container command, parsed by shardopt's parser."""
    serves = [w for w in split_shell(command) if w[:2] == ["shardopt", "serve"]]
    assert len(serves) == 1, f"expected one 'shardopt serve' in {command!r}"
    args = vars(build_parser().parse_args(serves[0][1:]))
    args.pop("handler")
    return args


def ray_start_params(words: list[str]) -> dict[str, Any]:
    """The options of a ``ray start`` command line, parsed by Ray's own click command."""
    from ray.scripts.scripts import start

    assert words[:2] == ["ray", "start"], words
    return start.make_context("ray start", list(words[2:])).params


def ray_start_of(command: Any) -> list[str]:
    starts = [w for w in split_shell(command) if w[:2] == ["ray", "start"]]
    assert len(starts) == 1, f"expected one 'ray start' in {command!r}"
    return starts[0]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def quantity(text: Any) -> float:
    """A Kubernetes quantity (``2Gi``, ``500M``, ``1000000000``) as a number."""
    units = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "": 1,
    }  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match and match[2] in units, f"not a quantity: {text!r}"
    return float(match[1]) * units[match[2]]


def compose_duration(text: str) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


# ----- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def gateway_serve(services) -> dict[str, Any]:
    return serve_args(with_defaults(services["gateway"]["command"]))


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for name in KUBERAY_FILES:
        loaded = list(yaml.safe_load_all((KUBERAY_DIR / name).read_text()))
        docs[name] = [d for d in loaded if d is not None]  # a leading '---' gives None
    return docs


def one(manifests, file: str, kind: str) -> dict[str, Any]:
    found = [d for d in manifests[file] if d["kind"] == kind]
    assert len(found) == 1, f"{file}: expected one {kind}, found {len(found)}"
    return found[0]


def ray_pod_specs(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in spec["workerGroupSpecs"]
    ]


def ray_containers(manifests) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) of every Ray container: RayCluster pods and the gateway."""
    for file in ("raycluster.yaml", "raycluster-gpu.yaml"):
        for pod in ray_pod_specs(one(manifests, file, "RayCluster")):
            for container in pod["containers"]:
                yield f"{file}:{container['name']}", pod, container
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"]:
        yield f"gateway.yaml:{container['name']}", pod, container


def secrets_example(manifests) -> dict[str, set[str]]:
    """Secret name -> its keys, from secrets.example.yaml."""
    return {
        doc["metadata"]["name"]: set(doc.get("stringData") or {}) | set(doc.get("data") or {})
        for doc in manifests["secrets.example.yaml"]
        if doc["kind"] == "Secret"
    }


def volume_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume mounted at ``path`` in ``container``."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{container['name']}: expected one mount at {path}"
    volumes = [v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"no volume named {mounts[0]['name']!r}"
    return volumes[0]


# ----- docker-compose.yml -------------------------------------------------------------------


def test_compose_matches_structural_schema(compose):
    jsonschema.validate(compose, COMPOSE_SCHEMA)


def test_compose_schema_rejects_unknown_keys(compose):
    """The schema has teeth: a misspelt service key or top-level key fails it."""
    bad_service = {**compose, "services": {**compose["services"]}}
    bad_service["services"]["gateway"] = {**compose["services"]["gateway"], "shmsize": "2gb"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_service, COMPOSE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**compose, "service": {}}, COMPOSE_SCHEMA)


def test_compose_services_build_the_project_image(services):
    dockerfile_arg = dict(
        re.match(r"(\w+)=(.*)", rest).groups()
        for word, rest in dockerfile_instructions()
        if word == "ARG" and "=" in rest
    )
    for name, service in services.items():
        assert service["command"], name
        assert with_defaults(service["image"]) == "shardopt:latest", name
        build = service["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert dockerfile.resolve() == DOCKERFILE.resolve(), name
        # build args exist in the Dockerfile, and compose's defaults are the Dockerfile's
        for arg, value in with_defaults(build.get("args", {})).items():
            assert arg in dockerfile_arg, f"{name}: build arg {arg} is no ARG of the Dockerfile"
            assert value == dockerfile_arg[arg], f"{name}: {arg} default differs"
        shm = with_defaults(str(service["shm_size"]))
        assert re.fullmatch(r"[0-9]+(b|k|kb|m|mb|g|gb)?", shm, re.I), f"{name}: shm_size {shm}"


def test_compose_ray_services_share_token_auth(services):
    tokens = set()
    for name in RAY_SERVICES:
        env = environment_of(services[name].get("environment", {}))
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE is not token"
        token = env.get("RAY_AUTH_TOKEN")
        assert token and VARIABLE.fullmatch(token), f"{name}: RAY_AUTH_TOKEN is not ${{...}}"
        tokens.add(VARIABLE.fullmatch(token)[1])
    assert tokens == {"RAY_AUTH_TOKEN"}, f"the Ray services read different variables: {tokens}"


def test_compose_ray_nodes_join_the_head(services):
    head = ray_start_params(with_defaults(services["ray-head"]["command"]))
    assert head["head"] and head["block"]
    assert head["object_store_memory"], "the head sets no object store size (shm_size bounds it)"
    for name in ("ray-worker-1", "ray-worker-2", "gateway"):
        params = ray_start_params(ray_start_of(with_defaults(services[name]["command"])))
        assert not params["head"], name
        assert host_port(params["address"]) == ("ray-head", head["port"]), name
        assert params["object_store_memory"], name
    gateway = ray_start_params(ray_start_of(with_defaults(services["gateway"]["command"])))
    assert gateway["num_cpus"] == 0, "the gateway's node must not take shards"
    assert not gateway["block"], "the gateway's `ray start` must return so serve can start"


def test_compose_depends_on_existing_services(services):
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in services and dependency != name, f"{name} -> {dependency}"
            if isinstance(depends, dict) and "condition" in depends[dependency]:
                condition = depends[dependency]["condition"]
                if condition == "service_healthy":
                    assert "healthcheck" in services[dependency], f"{dependency}: no healthcheck"
    for name in RAY_SERVICES[1:]:
        assert "ray-head" in services[name].get("depends_on", {}), f"{name} must wait for the head"


def test_compose_gateway_healthcheck_runs_shardopt_health(services, gateway_serve):
    test = with_defaults(services["gateway"]["healthcheck"]["test"])
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    words = shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:]
    assert words[:2] == ["shardopt", "health"], words
    health = build_parser().parse_args(words[1:])
    host, port = host_port(health.address)
    assert host in ("localhost", "127.0.0.1"), host
    assert port == gateway_serve["port"] == SERVE_PORT


def test_compose_gateway_serve_flags(gateway_serve):
    assert gateway_serve["host"] == "0.0.0.0", "the gateway must listen beyond loopback"
    assert host_port(gateway_serve["ray_address"]) == ("ray-head", 6379)
    assert gateway_serve["token_file"] and not gateway_serve["no_auth"]
    assert gateway_serve["checkpoint_dir"]


def test_compose_gateway_publishes_the_serve_port(services, gateway_serve):
    published = []
    for port in with_defaults(services["gateway"].get("ports", [])):
        if isinstance(port, dict):
            published.append(int(port["target"]))
        else:
            published.append(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    assert gateway_serve["port"] in published


def test_compose_gateway_publishes_on_loopback_by_default(services, gateway_serve):
    """The port is plaintext gRPC unless TLS is added: published on the host's loopback."""
    assert not gateway_serve["tls_cert"]
    for port in with_defaults(services["gateway"].get("ports", [])):
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
        assert host_ip == "127.0.0.1", f"published beyond loopback by default: {port!r}"


def test_env_example_tokens_are_refused_as_placeholders():
    """A copy of env.example with its secrets unchanged must not serve."""
    from shardopt.gateway.auth import weak_token_reason

    values = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    for name in ("SHARDOPT_TOKEN", "RAY_AUTH_TOKEN"):
        assert weak_token_reason(values[name]) is not None, name


def test_compose_gateway_checkpoint_volume(compose, services, gateway_serve):
    mounts = {}
    for volume in services["gateway"].get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source")
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    source = mounts.get(gateway_serve["checkpoint_dir"])
    assert source, f"nothing is mounted at --checkpoint-dir {gateway_serve['checkpoint_dir']}"
    assert source in (compose.get("volumes") or {}), f"volume {source!r} is not declared"


def test_compose_gateway_token_secret(compose, services, gateway_serve):
    paths = {}
    for secret in services["gateway"].get("secrets", []):
        if isinstance(secret, dict):
            target = secret.get("target", secret["source"])
            path = target if target.startswith("/") else f"/run/secrets/{target}"
            paths[path] = secret["source"]
        else:
            paths[f"/run/secrets/{secret}"] = secret
    source = paths.get(gateway_serve["token_file"])
    assert source, f"no secret is mounted at --token-file {gateway_serve['token_file']}"
    declared = (compose.get("secrets") or {}).get(source)
    assert declared, f"secret {source!r} is not declared at the top level"
    if "environment" in declared:
        assigned, _ = env_example_names()
        assert declared["environment"] in assigned, "the secret's variable is not in env.example"
    if "file" in declared:
        assert not pathlib.PurePath(declared["file"]).is_absolute()


def test_compose_gateway_stops_within_its_grace_period(services, gateway_serve):
    grace = services["gateway"].get("stop_grace_period", "10s")  # compose's default
    assert compose_duration(grace) >= gateway_serve["grace"], "SIGKILL would cut the drain"


def test_compose_variables_are_defined(compose):
    assigned, _ = env_example_names()
    defaults: dict[str, set[str]] = {}
    for text in strings_in(compose):
        for name, op, arg in VARIABLE.findall(text):
            if op in (":-", "-"):
                defaults.setdefault(name, set()).add(arg)
            elif op in (":?", "?"):
                assert arg.strip(), f"${{{name}{op}}} needs a message"
                assert name in assigned, f"the required {name} is not set in env.example"
            else:
                assert name in assigned, f"${{{name}}} has no default and is not in env.example"
        rest = VARIABLE.sub("", text).replace("$$", "")
        assert not BARE_VARIABLE.findall(rest), f"use ${{VAR}} with a default or message: {text}"
    differing = {name: d for name, d in defaults.items() if len(d) > 1}
    assert not differing, f"one variable, several defaults: {differing}"
    # the optional knobs env.example lists are the defaults compose uses
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"^\s*#\s*([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line):
            if match[1] in defaults:
                assert defaults[match[1]] == {match[2]}, f"env.example's {match[1]} differs"


def _compose_command() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        try:
            version = subprocess.run(
                [*command, "version"], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0:
            return command
    return None


def test_compose_config_with_docker_compose(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip("no 'docker compose' plugin or 'docker-compose' binary on PATH")
    env = {
        **os.environ,
        "RAY_AUTH_TOKEN": "a-test-ray-token-0123456789",
        "SHARDOPT_TOKEN": "a-test-gateway-token-0123456789",
    }
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ----- deploy/kuberay -----------------------------------------------------------------------


def test_kuberay_files_have_the_expected_documents(manifests):
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in manifests.items()}
    assert kinds == {
        "raycluster.yaml": ["RayCluster"],
        "raycluster-gpu.yaml": ["RayCluster"],
        "gateway.yaml": ["Deployment", "Service"],
        "secrets.example.yaml": ["Secret", "Secret", "Secret"],
    }
    api_versions = {
        "RayCluster": "ray.io/v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "Secret": "v1",
    }
    for name, docs in manifests.items():
        for doc in docs:
            assert doc["apiVersion"] == api_versions[doc["kind"]], (name, doc["kind"])
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("file", ["raycluster.yaml", "raycluster-gpu.yaml"])
def test_raycluster_spec(manifests, file):
    cluster = one(manifests, file, "RayCluster")
    assert cluster["metadata"]["name"] == "shardopt"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    groups = [head, *spec["workerGroupSpecs"]]
    assert head["template"]["spec"]["containers"], "the head has no containers"
    assert spec["workerGroupSpecs"], "no worker groups"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names), "worker group names repeat"
    assert head["rayStartParams"].get("include-dashboard") == "false"
    for group in groups:
        params = group["rayStartParams"]
        # KubeRay's CRD wants strings; "true" becomes a bare flag
        assert all(isinstance(v, str) for v in params.values()), params
        words = ["ray", "start"] + [
            f"--{k}" if v == "true" else f"--{k}={v}" for k, v in params.items()
        ]
        parsed = ray_start_params(words)  # every key is a real `ray start` option
        assert parsed["num_cpus"] is not None and parsed["object_store_memory"], params
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].startswith("shardopt:"), container["image"]
            resources = container["resources"]
            for key in ("cpu", "memory"):
                assert key in resources["requests"] and key in resources["limits"], key
            assert quantity(resources["limits"]["cpu"]) >= parsed["num_cpus"]


def test_ray_containers_mount_memory_backed_dev_shm(manifests):
    for where, pod, container in ray_containers(manifests):
        volume = volume_at(pod, container, "/dev/shm")
        assert volume.get("emptyDir", {}).get("medium") == "Memory", where
        size = quantity(volume["emptyDir"]["sizeLimit"])
        limit = quantity(container["resources"]["limits"]["memory"])
        assert size < limit, f"{where}: /dev/shm counts against the memory limit"


def test_ray_object_store_fits_in_dev_shm(manifests):
    for file in ("raycluster.yaml", "raycluster-gpu.yaml"):
        spec = one(manifests, file, "RayCluster")["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            shm = volume_at(pod, pod["containers"][0], "/dev/shm")["emptyDir"]["sizeLimit"]
            store = int(group["rayStartParams"]["object-store-memory"])
            assert store < quantity(shm), f"{file}: object store {store} > /dev/shm {shm}"
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    store = ray_start_params(ray_start_of(container["command"]))["object_store_memory"]
    assert store < quantity(volume_at(pod, container, "/dev/shm")["emptyDir"]["sizeLimit"])


def test_ray_containers_have_token_auth_from_the_secret(manifests):
    secrets = secrets_example(manifests)
    refs = set()
    for where, pod, container in ray_containers(manifests):
        for c in [container, *pod.get("initContainers", [])]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref, f"{where}: RAY_AUTH_TOKEN does not come from a Secret"
            assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {ref} not in secrets"
            refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"every Ray process needs the same token: {refs}"


def test_ray_containers_define_probes_that_need_no_dashboard(manifests):
    """KubeRay's default probes ask the dashboard (disabled here) and use wget: replace them."""
    for file in ("raycluster.yaml", "raycluster-gpu.yaml"):
        for pod in ray_pod_specs(one(manifests, file, "RayCluster")):
            for container in pod["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    command = container[probe]["exec"]["command"]
                    assert command[:2] == ["ray", "health-check"], (file, probe, command)


def test_ray_pods_and_the_gateway_reach_the_checkpoint_store(manifests):
    """Checkpoints go to an object store: each shard uploads its own object from its own pod and
    the gateway writes the commit, so every Ray container and the gateway get the store's
    credentials from one Secret, and no volume is shared between pods."""
    from shardopt.checkpoint.storage import location

    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    url = serve_args(pod["containers"][0]["command"])["checkpoint_dir"]
    assert url.startswith("s3://") and location(url) == url, url
    secrets = secrets_example(manifests)
    refs = set()
    for where, _, container in ray_containers(manifests):
        names = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert len(names) == 1, f"{where}: no object store credentials from a Secret"
        refs.add(names[0])
        env = {e["name"] for e in container.get("env", [])}
        assert not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, f"{where}: keys inline"
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/checkpoints" not in mounts, f"{where}: a checkpoint volume is still mounted"
    (secret,) = refs
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= secrets[secret]
    for docs in manifests.values():
        assert all(d["kind"] != "PersistentVolumeClaim" for d in docs)


def test_the_image_installs_the_object_store_file_system():
    runs = [rest for word, rest in _resolved_dockerfile() if word == "RUN"]
    assert any(re.search(r"""["']\.\[[\w,-]*\bs3\b""", run) for run in runs), "no .[s3] (s3fs)"


def test_raycluster_gpu_requests_gpus(manifests):
    text = (KUBERAY_DIR / "raycluster-gpu.yaml").read_text()
    assert "TORCH_VARIANT=cu126" in text, "say how the CUDA image is built"
    assert 'shard_resources={"GPU": 1}' in text, "say how to place one shard per GPU"
    cluster = one(manifests, "raycluster-gpu.yaml", "RayCluster")
    gpus = [
        quantity(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in cluster["spec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert gpus and min(gpus) >= 1, gpus
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head)
    cpu = one(manifests, "raycluster.yaml", "RayCluster")
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu), "the CPU cluster asks for GPUs"


def test_gateway_deployment_and_service(manifests):
    deployment = one(manifests, "gateway.yaml", "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1, "sessions live in one gateway process"
    labels = spec["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items(), "the selector misses the pod labels"
    containers = spec["template"]["spec"]["containers"]
    for container in containers:
        assert container["image"] and container["ports"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p.get("name"): p["containerPort"] for c in containers for p in c["ports"]}

    service = one(manifests, "gateway.yaml", "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    # the Service selects no Ray pod by accident
    for file in ("raycluster.yaml", "raycluster-gpu.yaml"):
        spec_ = one(manifests, file, "RayCluster")["spec"]
        for group in [spec_["headGroupSpec"], *spec_["workerGroupSpecs"]]:
            pod_labels = group["template"].get("metadata", {}).get("labels", {})
            assert not service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == SERVE_PORT and port.get("appProtocol") == "grpc"
    target = port.get("targetPort", port["port"])
    assert (ports[target] if isinstance(target, str) else target) == SERVE_PORT


def test_gateway_probes_hit_the_serve_port(manifests):
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "readinessProbe" in container and "livenessProbe" in container
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name)
        if probe is None:
            continue
        if "grpc" in probe:
            assert probe["grpc"]["port"] == SERVE_PORT, name
            assert probe["grpc"].get("service", "") in ("", "shardopt.v1.OptimizerService")
        else:
            words = probe["exec"]["command"]
            assert words[:2] == ["shardopt", "health"], (name, words)
            address = build_parser().parse_args(words[1:]).address
            assert host_port(address)[1] == SERVE_PORT, name


def test_gateway_command_matches_compose(manifests, services, gateway_serve):
    """The same `ray start` and `shardopt serve` flags as compose's gateway, but the head's
    Service name (KubeRay's ``<cluster>-head-svc``) in place of ``ray-head`` and an object store
    in place of the checkpoint volume."""
    cluster = one(manifests, "raycluster.yaml", "RayCluster")
    head_port = int(cluster["spec"]["headGroupSpec"]["rayStartParams"].get("port", 6379))
    head_service = f"{cluster['metadata']['name']}-head-svc"
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"] + pod["containers"][0].get("args", [])

    kube_serve = serve_args(command)
    assert host_port(kube_serve["ray_address"]) == (head_service, head_port)
    # checkpoints: compose's volume, KubeRay's object store (see the tests of each)
    same = {"ray_address": None, "checkpoint_dir": None}
    assert {**kube_serve, **same} == {**gateway_serve, **same}

    compose_start = ray_start_params(ray_start_of(with_defaults(services["gateway"]["command"])))
    kube_start = ray_start_params(ray_start_of(command))
    assert host_port(kube_start["address"]) == (head_service, head_port)
    assert {**kube_start, "address": None} == {**compose_start, "address": None}

    assert [w[:2] for w in split_shell(command)] == [["ray", "start"], ["shardopt", "serve"]]
    assert "exec shardopt serve" in command[-1], "serve must be PID 1 to get SIGTERM"


def test_gateway_volumes_match_its_flags(manifests, gateway_serve):
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # the token file comes from a Secret volume mounted above it
    token_file = pathlib.PurePosixPath(gateway_serve["token_file"])
    mount = next(
        m
        for m in container["volumeMounts"]
        if token_file.is_relative_to(m["mountPath"]) and str(token_file) != m["mountPath"]
    )
    assert mount.get("readOnly"), "mount secrets read-only"
    volume = volume_at(pod, container, mount["mountPath"])
    relative = str(token_file.relative_to(mount["mountPath"]))
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    key = items.get(relative, relative)
    assert key in secrets_example(manifests)[volume["secret"]["secretName"]]
    # a volume over /run/secrets would clash with the service account token under it
    if mount["mountPath"] in ("/run/secrets", "/var/run/secrets"):
        assert pod.get("automountServiceAccountToken") is False


def test_gateway_termination_grace_covers_serve_grace(manifests, gateway_serve):
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    assert pod.get("terminationGracePeriodSeconds", 30) >= gateway_serve["grace"]


def test_kubernetes_images_are_the_compose_image(manifests, services):
    image = with_defaults(services["gateway"]["image"])
    cluster = one(manifests, "raycluster.yaml", "RayCluster")
    pod = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]["spec"]
    images = {c["image"] for p in ray_pod_specs(cluster) for c in p["containers"]}
    images |= {c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {image}


def test_secrets_example_holds_placeholders(manifests):
    secrets = [d for d in manifests["secrets.example.yaml"] if d["kind"] == "Secret"]
    for secret in secrets:
        values = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
        assert values, secret["metadata"]["name"]
        for key, value in values.items():
            assert "replace-me" in value, f"{key}: an example must not hold a real secret"
    text = (KUBERAY_DIR / "secrets.example.yaml").read_text()
    assert "kubectl create secret" in text and "token_urlsafe" in text


# ----- deploy/Dockerfile --------------------------------------------------------------------


def _resolved_dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions with ``${ARG}``s replaced by their defaults."""
    instructions = dockerfile_instructions()
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip().strip('"')

    def resolve(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), text)

    return [(word, resolve(rest)) for word, rest in instructions]


def test_dockerfile_torch_variant_defaults_to_cpu():
    instructions = dockerfile_instructions()
    assert ("ARG", "TORCH_VARIANT=cpu") in instructions
    runs = [rest for word, rest in instructions if word == "RUN" and "torch==" in rest]
    assert runs and all("${TORCH_VARIANT}" in run for run in runs), "the variant picks the index"


def test_dockerfile_installs_torch_before_shardopt():
    instructions = _resolved_dockerfile()
    runs = [(i, rest) for i, (word, rest) in enumerate(instructions) if word == "RUN"]
    torch_at = [i for i, rest in runs if re.search(r"pip install\b.*\btorch==2\.13\.0\b", rest)]
    shardopt_at = [i for i, rest in runs if INSTALLS_SHARDOPT.search(rest)]
    assert torch_at, "no RUN installs torch==2.13.0"
    assert shardopt_at, "no RUN installs shardopt (pip install .)"
    assert torch_at[0] < shardopt_at[0]


def test_dockerfile_copies_protos_before_installing():
    instructions = _resolved_dockerfile()
    copies = [
        (i, rest.split()[:-1])
        for i, (word, rest) in enumerate(instructions)
        if word in ("COPY", "ADD") and not rest.startswith("--from")
    ]
    protos_at = [i for i, sources in copies if any(s.rstrip("/") == "protos" for s in sources)]
    install_at = [
        i
        for i, (word, rest) in enumerate(instructions)
        if word == "RUN" and INSTALLS_SHARDOPT.search(rest)
    ]
    assert protos_at and install_at and protos_at[0] < install_at[0]
    assert (ROOT / "protos" / "shardopt" / "v1").is_dir()
    # everything setup.py and the build need is copied
    copied = {s.rstrip("/") for _, sources in copies for s in sources}
    assert {"pyproject.toml", "setup.py", "shardopt", "protos"} <= copied


def test_dockerfile_exposes_the_gateway_port():
    exposed = [
        int(port.split("/")[0])
        for word, rest in dockerfile_instructions()
        if word == "EXPOSE"
        for port in rest.split()
    ]
    assert SERVE_PORT in exposed


# ----- metrics (issue #19) ------------------------------------------------------------------------


def test_compose_gateway_serves_and_publishes_metrics_on_loopback(services, gateway_serve):
    """The gateway serves /metrics (shardopt serve --metrics-port), published on the host's
    loopback like the gRPC port."""
    port = gateway_serve["metrics_port"]
    assert port and port != gateway_serve["port"]
    published = {}
    for entry in with_defaults(services["gateway"].get("ports", [])):
        host_ip, _, target = str(entry).rsplit(":", 2)
        published[int(target)] = host_ip
    assert published.get(port) == "127.0.0.1"


def test_kuberay_gateway_pod_is_scraped_at_its_metrics_port(manifests, gateway_serve):
    template = one(manifests, "gateway.yaml", "Deployment")["spec"]["template"]
    annotations = template["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    assert int(annotations["prometheus.io/port"]) == gateway_serve["metrics_port"]
    container = template["spec"]["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == gateway_serve["metrics_port"]


def test_dockerfile_exposes_the_metrics_port(gateway_serve):
    exposed = [
        int(port.split("/")[0])
        for word, rest in dockerfile_instructions()
        if word == "EXPOSE"
        for port in rest.split()
    ]
    assert gateway_serve["metrics_port"] in exposed
