# bmi: two commands do everything on a fresh Debian 12 machine (as root):
#   make demo   - install what is missing, build, and show a measured PD run
#   make test   - the same set-up, then the whole test suite
# Debian's python3: the interpreter the python3-venv and python3-dev installed
# below are for.  A python3 found first on PATH (pyenv, a local build) is one
# this Makefile did not install, and was 18% slower on bmid's hot path here
# (no PGO/LTO).  PYTHON=... picks another; the venv is made again for it.
PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEB_PACKAGES := gcc libc6-dev make pkg-config python3-venv python3-dev libssl-dev \
	libtss2-dev swtpm swtpm-tools tpm2-tools busybox-static cpio bubblewrap openssl \
	libxen-dev procps uidmap valgrind iproute2 openssh-client openssh-server
STAMP  := $(VENV)/.installed
VENV_PYTHON := $(VENV)/.python
# libbmi (bmi/embed): the C library; bmi.pc goes where pkg-config looks (a
# non-root user's into the venv, named by PKG_CONFIG_PATH for the demo).
LIBBMI := bmi/embed/libbmi.python
PKGCONFIG_DIR ?= $(if $(filter 0,$(shell id -u)),/usr/local/lib/pkgconfig,$(CURDIR)/$(VENV)/pkgconfig)

.PHONY: all deps venv libbmi install-pc demo test bench clean FORCE

all: venv

# Install only the Debian packages that are missing (apt is slow even when
# there is nothing to do).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root (or install: $$missing)" >&2; exit 1; fi; \
		if [ -e /usr/sbin/policy-rc.d ]; then rcd=; else \
			rcd=/usr/sbin/policy-rc.d; printf '#!/bin/sh\nexit 101\n' >$$rcd; chmod 755 $$rcd; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		status=$$?; [ -z "$$rcd" ] || rm -f $$rcd; [ $$status = 0 ] || exit $$status; \
		if [ -d /run/systemd/system ] && [ -e /lib/systemd/system/ssh.service ]; then \
			systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true; fi; \
	fi

# Which python made the venv: another one (PYTHON changed, or a venv older than
# this file) has it made again, with everything in it.
$(VENV_PYTHON): FORCE
	@if [ "$$(cat $@ 2>/dev/null)" != "$(PYTHON)" ]; then \
		if [ -e $(VENV) ]; then echo "making $(VENV) again with $(PYTHON)"; rm -rf $(VENV); fi; \
		mkdir -p $(VENV) && echo "$(PYTHON)" > $@; fi

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/*/*.c csrc/*/*.h bmi/_build/*.py) $(VENV_PYTHON) | deps
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

# libbmi built in place for this checkout, its embedded interpreter being the venv's python.
$(LIBBMI): $(STAMP) bmi/embed/bmi.h bmi/embed/build.py
	$(PY) -m bmi.embed.build --python $(CURDIR)/$(PY)

libbmi: venv $(LIBBMI)

install-pc: libbmi
	install -d $(PKGCONFIG_DIR)
	$(PY) -m bmi.embed --pc > $(PKGCONFIG_DIR)/bmi.pc
	@echo "installed $(PKGCONFIG_DIR)/bmi.pc"

demo: venv install-pc
	$(VENV)/bin/bmi info
	$(PY) examples/demo.py
	PKG_CONFIG_PATH=$(PKGCONFIG_DIR) sh -c 'cc examples/toolstack.c $$(pkg-config --cflags --libs bmi) -o $(VENV)/toolstack'
	$(VENV)/toolstack

test: venv libbmi
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv libbmi
	$(PY) bench/spawn.py
	$(PY) bench/embed.py
	$(PY) bench/net.py

clean:
	rm -rf $(VENV) $(KEYLIME_VENV) build dist *.egg-info bmi/*.so bmi/_*_cffi.c bmi/embed/libbmi.* tests/.build

# --- Fleet attestation: a stock Keylime verifier attests bmi's agent --------
# keylime 7.14.3 from PyPI in its own venv on Debian's python3 (keylime
# imports gpg, which python3-gpg provides); its wheel declares no
# dependencies and ships no config templates (they are in the sdist).
KEYLIME_VENV := .venv-keylime
KEYLIME_PACKAGES := python3-gpg python3-venv swtpm swtpm-tools
KEYLIME_DEPS := cryptography tornado pyzmq pyyaml requests 'sqlalchemy>=2.0.39' alembic packaging psutil \
	lark pyasn1 pyasn1-modules jinja2 jsonschema

.PHONY: keylime-venv test-keylime

$(KEYLIME_VENV)/.installed:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(KEYLIME_PACKAGES)'
	rm -rf $(KEYLIME_VENV)
	/usr/bin/python3 -m venv $(KEYLIME_VENV)
	$(KEYLIME_VENV)/bin/pip install -q keylime==7.14.3 $(KEYLIME_DEPS)
	$(KEYLIME_VENV)/bin/pip download -q --no-deps --no-binary :all: keylime==7.14.3 -d $(KEYLIME_VENV)/sdist
	tar xzf $(KEYLIME_VENV)/sdist/keylime-7.14.3.tar.gz -C $(KEYLIME_VENV)/sdist
	mkdir -p $(KEYLIME_VENV)/gpg && ln -sfn /usr/lib/python3/dist-packages/gpg $(KEYLIME_VENV)/gpg/gpg
	echo "$(abspath $(KEYLIME_VENV))/gpg" > $$($(KEYLIME_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/python3-gpg.pth
	$(KEYLIME_VENV)/bin/python -c 'import keylime.signing'
	touch $@

keylime-venv: $(KEYLIME_VENV)/.installed

test-keylime: venv keylime-venv
	BMI_NO_SKIP=1 BMI_KEYLIME_VENV=$(abspath $(KEYLIME_VENV)) $(PY) -m pytest -q -rs -p no:cacheprovider tests/keylime

# --- QEMU test rigs (rig/): kernels and hypervisors this host lacks ---------
# Boot the Debian kernel (pure cgroup v2) or Xen with it as dom0 in QEMU TCG
# and run parts of the suite there; see README "Test rigs".
RIG_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static cpio \
	xen-hypervisor-4.17-amd64 xen-utils-4.17 libxen-dev xenstore-utils
XEN_TESTS ?=

.PHONY: rig-deps rig-selfcheck test-cgroup2 test-xen test-fresh

rig-deps:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(RIG_PACKAGES)'

# The rigs' host side (tests/rig: initramfs, module order of the kernel they
# boot), here where that kernel is installed: `make test` skips what needs
# it on a machine without the rig packages, a rig target may not.
rig-selfcheck: venv rig-deps
	BMI_NO_SKIP=1 $(PY) -m pytest -q -rs -p no:cacheprovider tests/rig

test-cgroup2: rig-selfcheck
	$(PY) rig/rig.py cgroup2

test-xen: rig-selfcheck
	$(PY) rig/rig.py xen -- $(XEN_TESTS)

# The quick start (make demo, make test) in a fresh debootstrap'ed Debian 12
# root with a fresh clone of HEAD: what a new machine does.  See rig/fresh.sh.
test-fresh:
	rig/fresh.sh
