"""The playbook itself: idempotent, and it refuses a bad inventory before touching a node."""
import re

import pytest
import yaml

import fleet as fleet_tools

pytestmark = pytest.mark.fleet


def _rebuilt_wheelhouse(result) -> bool:
    return bool(re.search(r"TASK \[python_env : Build the wheelhouse[^\n]*\n+changed:", result.stdout))


def test_second_run_changes_nothing(fleet):
    # The fleet fixture's run was the first of this session; this is the second, judged as it is
    # (a rebuilt wheelhouse here means the build is not reproducible from an unchanged src/).
    again = fleet_tools.provision(fleet)
    assert not _rebuilt_wheelhouse(again), again.stdout[-4000:]
    assert again.ok, again.stdout[-4000:]
    assert set(again.recap) == {h.name for h in fleet.hosts}
    changed = {host: r["changed"] for host, r in again.recap.items() if r["changed"]}
    assert not changed, f"changed on a rerun: {changed}\n{again.stdout[-4000:]}"


def _bad_inventory(fleet, tmp_path, host: str, **override) -> str:
    inv = yaml.safe_load(fleet.inventory_path.read_text())
    hostvars = inv["fleet"]["hosts"][host]
    for key, value in override.items():
        if value is None:
            hostvars.pop(key, None)
        else:
            hostvars[key] = value
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inv))
    return str(path)


def _failure_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("fatal:")]


@pytest.mark.parametrize("override, message", [
    ({"mlx_interface": None}, "h2: mlx_interface must name the interface MLX traffic is pinned to"),
    ({"mlx_interface": ["eth0"]}, "pinned to (a string such as en0 or bridge0); got ["),
    ({"mlx_backend": "carrier-pigeon"}, "h2: mlx_backend must be ring, mpi or any"),
], ids=["missing", "not-a-string", "bad-backend"])
def test_malformed_inventory_stops_before_any_change(bare_fleet, tmp_path, override, message):
    result = fleet_tools.provision(bare_fleet, inventory=_bad_inventory(bare_fleet, tmp_path, "h2", **override))
    assert result.returncode != 0
    assert any(message in line for line in _failure_lines(result)), result.stdout[-3000:]
    assert "Gathering Facts" not in result.stdout  # stopped before connecting to any node


def test_missing_interface_stops_before_any_change(bare_fleet, tmp_path):
    result = fleet_tools.provision(bare_fleet, inventory=_bad_inventory(bare_fleet, tmp_path, "h3", mlx_interface="eth9"))
    assert result.returncode != 0
    assert any("h3: pinned interface eth9 (mlx_interface) is missing" in line for line in _failure_lines(result)), \
        result.stdout[-3000:]
    assert all(r["changed"] == 0 for r in result.recap.values()), result.recap
    assert "TASK [node" not in result.stdout  # no role ran
