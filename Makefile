# The two set-up commands of the README. Each creates .venv if missing, installs everything, and runs.
#   make demo   - the toy-world demo end to end (outputs under runs/demo/)
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned: these are the builds on this machine's disk; the project's own
# dependency ranges then accept them instead of pulling another torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The search page's test drives Debian's chromium (Playwright's own browser download cannot work offline).
# As root on Debian it is installed here; elsewhere that test is skipped unless CIR_REQUIRE_BROWSER=1 (CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "make: chromium is not installed and could not be; the browser test will be skipped"

clean:
	rm -rf $(VENV) runs .pytest_cache
