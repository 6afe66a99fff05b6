# Every target installs what it needs first, so `make demo` and `make test` work on a fresh
# Debian 12 machine as root and are cheap to repeat.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-pip etcd-server etcd-client iproute2 util-linux \
	nfs-ganesha nfs-ganesha-vfs libnfs-utils xfsprogs e2fsprogs faketime gcc libc6-dev
STAMP_APT := .deps-apt
STAMP_VENV := $(VENV)/.installed

.PHONY: deps test lint unit demo bench bench-scale bench-keepalive bench-operations chaos lab-down clean

deps: $(STAMP_APT) $(STAMP_VENV)

$(STAMP_APT): Makefile
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	touch $@

$(STAMP_VENV): pyproject.toml $(STAMP_APT)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The scripts without a .py suffix are named: `ruff check .` would skip them.
lint: deps
	$(VENV)/bin/ruff check . bench/failover bench/scale bench/events bench/keepalive bench/operations compose/chaos \
		compose/lab compose/demo

unit: deps
	$(VENV)/bin/pytest -q tests/unit

# Separate runs: the lab self-test and the chaos run build and destroy labs of their own,
# which must not happen under the session-wide lab of the nfs-ha tests.
test: deps lint
	$(VENV)/bin/pytest -v -rs tests/unit tests/lab_selftest
	$(VENV)/bin/pytest -v -rs tests/lab
	$(VENV)/bin/pytest -v -rs tests/chaos

demo: deps
	$(PY) compose/demo

bench: deps
	$(PY) bench/failover

bench-scale: deps
	$(PY) bench/scale

bench-keepalive: deps
	$(PY) bench/keepalive

bench-operations: deps
	$(PY) bench/operations

chaos: deps
	$(PY) compose/chaos --faults 200 --seed 1

lab-down: deps
	$(PY) compose/lab down

clean: lab-down
	rm -rf $(VENV) $(STAMP_APT)
