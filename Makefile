# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INVENTORY ?= $(if $(wildcard .fleet/inventory.yml),.fleet/inventory.yml,inventory/local.yml)
N ?= 3

.PHONY: install train test test-unit bench faults provision fleet-up fleet-down reset lint clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

train: install
	$(BIN)/invoke train --devices 4

# -rs: every skip says why. A test that cannot run under CI (no fleet, no guide) is an error there.
# --durations: the slowest tests of every run, to keep `make test` under its time.
# -n 2: two workers, as many as the reference machine has cores; many tests wait on timeouts and
# other processes rather than compute. The fleet's tests all run on one of them (tests/conftest.py).
PYTEST := $(BIN)/python -m pytest -q -rs --durations=25 -n 2 --dist loadgroup

test: install
	$(PYTEST) tests

test-unit: install
	$(PYTEST) tests -m "not multiproc and not fleet"

bench: install
	$(BIN)/python bench/run.py

# The fault matrix on the test fleet (root): docs/reliability.md; the table goes to build/faults.md.
faults: install
	$(BIN)/python tools/faults.py $(if $(ONLY),--only $(ONLY))

provision: install
	PATH=$(CURDIR)/$(BIN):$$PATH ANSIBLE_CONFIG=$(CURDIR)/ansible/ansible.cfg \
	$(if $(findstring .fleet/,$(INVENTORY)),ANSIBLE_HOME=$(CURDIR)/.fleet/ansible) \
	$(BIN)/ansible-playbook -i $(INVENTORY) ansible/site.yml $(ANSIBLE_ARGS)

# Unequal hosts: make fleet-up N=3 CPU=0.5,0.5,0.125 MEMORY=6G,6G,2G (cgroup CPU quota and memory limit).
fleet-up: install
	$(BIN)/python tools/fleet.py up --hosts $(N) $(if $(CPU),--cpu $(CPU)) $(if $(MEMORY),--memory $(MEMORY))

fleet-down:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) tools/fleet.py down

# With the test fleet up, its ssh wrapper must come first so `ssh h1` resolves.
reset: install
	PATH=$(if $(wildcard .fleet/bin/ssh),$(CURDIR)/.fleet/bin:)$$PATH $(BIN)/mlx-train reset-distributed $(if $(CLUSTER),--cluster $(CLUSTER))

lint: install
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH ../$(BIN)/ansible-lint

clean:
	rm -rf $(VENV) build src/*.egg-info
