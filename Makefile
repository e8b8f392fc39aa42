# Two commands do all the set-up (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates or refreshes the project's virtual environment in .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= outputs/demo
MODELS ?= models
PYTEST_ARGS ?=

# Real ComfyUI 0.3.75 in a venv of its own set up as a user's (ComfyUI's requirements as the registry
# resolves them, then the pack's), + headless Chromium, for the `comfyui`-marked tests (tools/build_*.sh).
COMFY_DIR     := .cache/comfyui
COMFY_PY      := $(COMFY_DIR)/venv/bin/python
COMFY_STAMP   := $(COMFY_DIR)/.installed
BROWSER_DIR   := .cache/browser
BROWSER_STAMP := $(BROWSER_DIR)/.installed
# comfy-cli 1.23.0 in its own venv, for the registry check of pyproject.toml (`make validate-pack`).
COMFYCLI_DIR   := .cache/comfy-cli
COMFYCLI_STAMP := $(COMFYCLI_DIR)/.installed

.PHONY: demo demo-scenes test venv clean comfyui browser comfy-cli validate-pack workflows test-tf5

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The main job: a tiny PS-VAE trained on photos with the real trainer. `demo-scenes`: scenes models
# (MODELS: a folder holding scenes_{psvae,t2i,edit}.safetensors) turn prompts into images and carry
# out edits, scored by code (docs/SCENES.md); no trained scenes models ship yet.
demo: $(STAMP)
	$(PY) -m trainer.demo --out $(OUT)

demo-scenes: $(STAMP)
	$(PY) -m trainer.scenes.demo --models $(MODELS) --out $(OUT)

# Only the file-format and encoder tests, what depends on transformers' module layout, run again in
# ComfyUI's venv: there transformers is the newest 5.x the registry serves (docs/CHECKPOINTS.md).
test-tf5: $(COMFY_STAMP)
	$(COMFY_PY) -m pytest tests/test_checkpoint.py tests/test_encoders.py $(PYTEST_ARGS)

# A venv of its own; .venv is built first so that its PyTorch files can be hard-linked in rather than
# stored twice (tools/link_packages.py). A changed requirements.txt re-runs the pack's install step.
comfyui: $(COMFY_STAMP)

$(COMFY_STAMP): tools/build_comfyui.sh tools/link_packages.py constraints.txt requirements.txt | $(STAMP)
	tools/build_comfyui.sh $(COMFY_DIR) $(PYTHON) $(PY)
	touch $(COMFY_STAMP)

browser: $(BROWSER_STAMP)

$(BROWSER_STAMP): tools/build_browser.sh tools/browser/package.json tools/browser/package-lock.json
	tools/build_browser.sh $(BROWSER_DIR)
	touch $(BROWSER_STAMP)

comfy-cli: $(COMFYCLI_STAMP)

$(COMFYCLI_STAMP): tools/build_comfycli.sh
	tools/build_comfycli.sh $(COMFYCLI_DIR) $(PYTHON)
	touch $(COMFYCLI_STAMP)

# What the Comfy registry checks before publishing (offline; also run by tests/test_comfyui_package.py).
validate-pack: $(COMFYCLI_STAMP)
	HOME=$(CURDIR)/$(COMFYCLI_DIR)/home $(COMFYCLI_DIR)/bin/comfy --skip-prompt node validate

# Regenerate workflows/*.json + .jpg through the real frontend (NAMES="a b" for only some).
workflows: $(STAMP) $(COMFY_STAMP) $(BROWSER_STAMP)
	$(PY) tools/make_workflows.py $(NAMES)

test: $(STAMP) $(COMFY_STAMP) $(BROWSER_STAMP) $(COMFYCLI_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-tf5

clean:
	rm -rf $(VENV) .cache outputs
