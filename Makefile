# bmi: two commands do everything on a fresh Debian 12 machine (as root):
#   make demo   - install what is missing, build, and show a measured PD run
#   make test   - the same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEB_PACKAGES := gcc libc6-dev make pkg-config python3-venv python3-dev libssl-dev \
	libtss2-dev swtpm swtpm-tools tpm2-tools busybox-static cpio bubblewrap openssl \
	libxen-dev procps uidmap iproute2
STAMP  := $(VENV)/.installed

.PHONY: all deps venv demo test bench clean

all: venv

# Install only the Debian packages that are missing (apt is slow even when
# there is nothing to do).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root (or install: $$missing)" >&2; exit 1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h bmi/_build/*.py) | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# A venv made before a shim could be built (libxen-dev came later) lacks it,
# and pip sees nothing to redo: rebuild when missing.py names one.
venv: deps $(STAMP)
	@$(PY) bmi/_build/missing.py >/dev/null || { \
		echo "rebuilding: $$($(PY) bmi/_build/missing.py)"; \
		$(PY) -m pip install -q -e '.[test]' && $(PY) bmi/_build/missing.py; }

demo: venv
	$(VENV)/bin/bmi info
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) bench/spawn.py
	$(PY) bench/net.py

clean:
	rm -rf $(VENV) build dist *.egg-info bmi/*.so bmi/_*_cffi.c tests/.build

# --- QEMU test rigs (rig/): kernels and hypervisors this host lacks ---------
# Boot the Debian kernel (pure cgroup v2) or Xen with it as dom0 in QEMU TCG
# and run parts of the suite there; see README "Test rigs".
RIG_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static cpio \
	xen-hypervisor-4.17-amd64 xen-utils-4.17 libxen-dev xenstore-utils
XEN_TESTS ?=

.PHONY: rig-deps test-cgroup2 test-xen test-fresh

rig-deps:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(RIG_PACKAGES)'

test-cgroup2: venv rig-deps
	$(PY) rig/rig.py cgroup2

test-xen: venv rig-deps
	$(PY) rig/rig.py xen -- $(XEN_TESTS)

# The quick start (make demo, make test) in a fresh debootstrap'ed Debian 12
# root with a fresh clone of HEAD: what a new machine does.  See rig/fresh.sh.
test-fresh:
	rig/fresh.sh
