"""docker-compose.yml: a single persistent Qdrant node, and a 3-node cluster profile, keys from the environment."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_single_node_is_persistent_and_keyed_from_the_environment() -> None:
    single = _services()["qdrant"]
    assert "profiles" not in single  # `docker compose up` starts it
    assert any(v.endswith(":/qdrant/storage") for v in single["volumes"])
    assert single["environment"]["QDRANT__SERVICE__API_KEY"].startswith("${QDRANT__SERVICE__API_KEY")
    assert "6333:6333" in single["ports"]
    assert single["environment"]["QDRANT__SERVICE__JWT_RBAC"] == "true"  # per-team tokens (cbir index token)


def test_cluster_profile_has_three_bootstrapped_nodes() -> None:
    services = _services()
    nodes = {name: s for name, s in services.items() if "cluster" in s.get("profiles", [])}
    assert sorted(nodes) == ["qdrant-node-1", "qdrant-node-2", "qdrant-node-3"]
    for name, node in nodes.items():
        assert node["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert node["environment"]["QDRANT__SERVICE__API_KEY"].startswith("${")
        assert f"http://{name}:6335" in node["command"]
        assert not any("6335" in p for p in node["ports"])  # peer port stays private
        assert any(v.endswith(":/qdrant/storage") for v in node["volumes"])
    for name in ("qdrant-node-2", "qdrant-node-3"):
        command = nodes[name]["command"]
        assert command[command.index("--bootstrap") + 1] == "http://qdrant-node-1:6335"
    host_ports = [p.split(":")[0] for node in nodes.values() for p in node["ports"]]
    assert len(host_ports) == len(set(host_ports))
