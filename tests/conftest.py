"""Fixtures for the test fleet (tools/fleet.py): network namespaces with sshd, as root.

Lazy: only tests that ask for `bare_fleet`, `fleet`, `provisioning`, `cluster` or `corpus` bring
the fleet up, once per session. Mark them `@pytest.mark.fleet` so `make test-unit` can leave them
out. A machine that cannot make the fleet skips them, except under CI (helpers.required()), where
that is an error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FLEET_SIZE, unavailable

import fleet as fleet_tools  # noqa: E402  (tools/fleet.py, on the path from helpers; importing it starts nothing)

# The real-model fixtures (a tiny llama, chat data; made offline): tests/tiny_llama.py.
pytest_plugins = ["tiny_llama"]


FLEET_FIXTURES = {"bare_fleet", "fleet", "provisioning", "cluster"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # make test runs two xdist workers (--dist loadgroup). There is one fleet per machine (its names
    # are global): every test that uses it runs on the same worker, one after another, and shares it.
    for item in items:
        if item.get_closest_marker("fleet") or FLEET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("fleet"))


def pytest_collection_finish(session):
    # xdist's loadgroup reads the group from the node id; if that ever stops working, two workers
    # would each bring up the one fleet over the other's. Refuse to start rather than run so.
    if getattr(session.config.option, "loadgroup", False):
        loose = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if loose:
            raise pytest.UsageError(f"xdist did not group {loose[0]} with the other fleet tests (pytest-xdist "
                                    "and pytest versions): the fleet's tests would run on two workers at once")


def _why_no_fleet() -> str | None:
    """Why this machine cannot run the test fleet, or None when it can."""
    if os.geteuid() != 0:
        return "the test fleet needs root (network namespaces, bind mounts)"
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen", "/usr/sbin/sshd", "/usr/bin/ssh"):
        if not shutil.which(tool):
            return f"the test fleet needs {tool} (make install runs scripts/system-deps.sh)"
    # Named for this process: a probe left by a killed run (or another session's) is not this one's.
    probe = f"{fleet_tools.NETNS_PREFIX}probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode:
        return f"cannot create network namespaces here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="session")
def bare_fleet():
    """FLEET_SIZE hosts with sshd, not provisioned. Brought down at the end of the session,
    unless it was already up before (`make fleet-up`): then it is reused and left up."""
    reason = _why_no_fleet()
    if reason:
        unavailable(reason)
    was_up = fleet_tools.status()["up"] and len(fleet_tools.load().hosts) == FLEET_SIZE
    try:
        yield fleet_tools.up(FLEET_SIZE)
    finally:
        if not was_up:
            fleet_tools.down()


@pytest.fixture(scope="session")
def fleet(bare_fleet):
    """The fleet after one `ansible-playbook site.yml` run; its result is `fleet.provisioning`."""
    if not (Path(sys.executable).parent / "ansible-playbook").exists():
        unavailable("ansible-playbook is not installed next to this Python (make install)")
    result = fleet_tools.provision(bare_fleet)
    if not result.ok:
        pytest.fail(f"provisioning failed (exit {result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}")
    bare_fleet.provisioning = result
    return bare_fleet


@pytest.fixture(scope="session")
def provisioning(fleet) -> fleet_tools.ProvisionResult:
    return fleet.provisioning


@pytest.fixture(scope="session")
def cluster(fleet, tmp_path_factory) -> Path:
    """The cluster file `mlx-train configure --distributed` writes for the provisioned fleet."""
    return fleet_tools.configure(fleet, tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus where every fleet host sees it (the fleet shares /tmp). Not the stdlib
    (the default): the controller's Python and the nodes' may be different patch releases."""
    return fleet_tools.corpus(tmp_path_factory.mktemp("corpus"))
