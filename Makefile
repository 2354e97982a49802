# fedrad — every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

# nginx fronts the SuperLink on the coordinator (server/proxy.py). We only run our
# own nginx processes; the distribution's nginx service is never used.
ENSURE_NGINX = command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	echo "installing nginx (apt-get)"; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; }

install: $(STAMP)
	@$(ENSURE_NGINX)

# torch is installed first and pinned: a CPU build, so no dependency can pull a
# multi-GB CUDA build in its place.
$(STAMP): pyproject.toml
	@$(ENSURE_NGINX)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m simulations.demo

# ruff and mypy (strict for common/; settings in pyproject.toml) before the tests.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

clean:
	rm -rf .demo .pytest_cache
