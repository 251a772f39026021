"""testinfra hosts over the fleet's ssh_config (ControlMaster keeps each check ~0.1 s)."""
import pytest
import testinfra
import yaml

from helpers import FLEET_HOSTS

# The nodes tests/conftest.py brings up (helpers.FLEET_SIZE of them).
NODES = FLEET_HOSTS


@pytest.fixture(scope="session")
def inventory(fleet) -> dict:
    """Host name -> its vars in the inventory the fleet was provisioned from."""
    hosts = yaml.safe_load(fleet.inventory_path.read_text())["fleet"]["hosts"]
    assert sorted(hosts) == NODES
    return hosts


@pytest.fixture(scope="session", params=NODES)
def node(request, fleet):
    """A testinfra host for each fleet node; `node.backend.hostname` is its name."""
    return testinfra.get_host(f"ssh://{request.param}", ssh_config=str(fleet.ssh_config))
