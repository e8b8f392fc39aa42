# Two commands do all the set-up (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates or refreshes the project's virtual environment in .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= outputs/demo
PYTEST_ARGS ?=

# Real ComfyUI 0.3.75 + headless Chromium for the `comfyui`-marked tests (tools/build_*.sh).
COMFY_DIR     := .cache/comfyui
COMFY_STAMP   := $(COMFY_DIR)/.installed
BROWSER_DIR   := .cache/browser
BROWSER_STAMP := $(BROWSER_DIR)/.installed

.PHONY: demo test venv clean comfyui browser

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer.demo --out $(OUT)

# ComfyUI's requirements go into the project venv, so a rebuilt venv re-runs this (fast when cached).
comfyui: $(COMFY_STAMP)

$(COMFY_STAMP): $(STAMP) tools/build_comfyui.sh constraints.txt
	tools/build_comfyui.sh $(COMFY_DIR) $(PY)
	touch $(COMFY_STAMP)

browser: $(BROWSER_STAMP)

$(BROWSER_STAMP): tools/build_browser.sh tools/browser/package.json tools/browser/package-lock.json
	tools/build_browser.sh $(BROWSER_DIR)
	touch $(BROWSER_STAMP)

test: $(STAMP) $(COMFY_STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache outputs
