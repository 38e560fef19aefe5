"""The hosted-CI workflow for the live-server tests (.github/workflows/server.yml), checked structurally: it cannot
run where it was written (no Docker engine, no internet), so these checks keep it consistent with the code it
drives: the README's install command, the test switches the suite reads, docker-compose.yml's cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "server.yml"
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def _runs(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def _env(workflow: dict[str, Any], job: dict[str, Any]) -> dict[str, str]:
    return {**workflow.get("env", {}), **job.get("env", {})}


def test_header_says_where_it_cannot_run() -> None:
    header = "".join(line for line in WORKFLOW.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "no Docker engine and no internet" in header and "CBIR_TEST_QDRANT_URL" in header


def test_it_triggers_on_pushes_and_pull_requests(workflow: dict[str, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))          # YAML 1.1 reads a bare `on` as True
    assert {"push", "pull_request"} <= set(triggers)


def test_both_topologies_run_the_live_server_tests(workflow: dict[str, Any]) -> None:
    jobs = workflow["jobs"]
    assert set(jobs) == {"single-node", "cluster"}
    selected = set(shlex.split(workflow["env"]["LIVE_SERVER_TESTS"]))
    for name in ("tests/test_index.py", "tests/test_versions.py", "tests/test_parts.py", "tests/test_server_path.py"):
        assert name in selected and (REPO / name).is_file()
    reads_url = [name for name in selected if "CBIR_TEST_QDRANT_URL" in (REPO / name).read_text()
                 or "SERVER_URL" in (REPO / name).read_text()]
    assert len(reads_url) >= 3                                   # the files whose server checks the variable enables
    for job in jobs.values():
        env = _env(workflow, job)
        assert env["CBIR_TEST_QDRANT_URL"] == "http://localhost:6333"
        assert env["CBIR_TEST_QDRANT_API_KEY"] == env["QDRANT__SERVICE__API_KEY"]
        assert re.search(r"\.venv/bin/python -m pytest .*\$LIVE_SERVER_TESTS", _runs(job))
    single, cluster = _env(workflow, jobs["single-node"]), _env(workflow, jobs["cluster"])
    assert (single["CBIR_TEST_QDRANT_SHARDS"], single["CBIR_TEST_QDRANT_REPLICAS"]) == ("1", "1")
    assert (cluster["CBIR_TEST_QDRANT_SHARDS"], cluster["CBIR_TEST_QDRANT_REPLICAS"]) == ("3", "2")


def test_the_variables_are_the_ones_the_suite_reads() -> None:
    source = (REPO / "tests" / "test_index.py").read_text()
    for name in ("CBIR_TEST_QDRANT_URL", "CBIR_TEST_QDRANT_API_KEY", "CBIR_TEST_QDRANT_SHARDS",
                 "CBIR_TEST_QDRANT_REPLICAS"):
        assert name in source, name


def test_install_is_the_readmes_command(workflow: dict[str, Any]) -> None:
    readme = (REPO / "README.md").read_text()
    command = re.search(r"python3 -m venv \.venv && \.venv/bin/pip install -q -c constraints\.txt "
                        r"-c requirements-lock\.txt -e '\.\[test\]'", readme)
    assert command is not None
    for job in workflow["jobs"].values():
        assert command.group(0) in _runs(job)


def test_single_node_is_a_qdrant_service_container_like_compose(workflow: dict[str, Any]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    tag = compose["x-qdrant"]["image"]
    service = workflow["jobs"]["single-node"]["services"]["qdrant"]
    assert service["image"] == tag and tag.startswith("qdrant/qdrant:")
    assert "6333:6333" in service["ports"]
    assert service["env"]["QDRANT__SERVICE__API_KEY"] == workflow["env"]["QDRANT__SERVICE__API_KEY"]
    assert service["env"]["QDRANT__SERVICE__JWT_RBAC"] == "true"          # the team-token test needs it


def test_cluster_is_composes_three_bootstrapped_nodes(workflow: dict[str, Any]) -> None:
    runs = _runs(workflow["jobs"]["cluster"])
    assert "docker compose --profile cluster up -d qdrant-node-1 qdrant-node-2 qdrant-node-3" in runs
    assert '"peers"' in runs and '= 3 ]' in runs                         # waits for all three peers
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    nodes = {name: services[name] for name in ("qdrant-node-1", "qdrant-node-2", "qdrant-node-3")}
    for name, node in nodes.items():
        assert node["profiles"] == ["cluster"] and node["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert node["command"][-2:] == ["--uri", f"http://{name}:6335"]
    assert nodes["qdrant-node-1"]["ports"][0] == "6333:6333"              # the URL the tests use
    for name in ("qdrant-node-2", "qdrant-node-3"):
        assert nodes[name]["command"][1:3] == ["--bootstrap", "http://qdrant-node-1:6335"]
