# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test serve bench gpu-check clean

# One install for demo, tests and CI: the project and its test extras, with torch pinned
# to the release CI has on disk (a CPU build there; pip picks a CUDA build elsewhere).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Offline demo on the built-in, clearly labelled UNTRAINED tiny model.
demo: $(VENV)/.installed
	$(BIN)/sharp-runpod predict samples/coffee.jpg -o out --checkpoint tiny-untrained --device cpu

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The worker's HTTP server (a load-balancing endpoint's) with the tiny model on the CPU, on
# 127.0.0.1:$(PORT): POST /predict, GET /ping, and the viewer page at /. The page takes Spark
# and three.js from tests/js/node_modules when installed, else from their pinned CDN URLs.
PORT ?= 8000
serve: $(VENV)/.installed
	@echo "The page: http://127.0.0.1:$(PORT)/ (the model loads first: GET /ping says 200 when ready)"
	SHARP_SERVE=http SHARP_HOST=127.0.0.1 PORT=$(PORT) SHARP_CHECKPOINT=tiny-untrained SHARP_DEVICE=cpu \
		$(if $(wildcard $(JS)/node_modules/three),SHARP_VIEWER_MODULES=$(JS)/node_modules) \
		$(BIN)/python -m handler

bench: $(VENV)/.installed
	$(BIN)/python -m pytest benchmarks --benchmark-enable

# The GPU acceptance run: every backend timed and validated, results in $OUT or out/gpu_check/
# (benchmarks/gpu_check.py). The venv's python where there is one; a bare GPU machine has none.
# Options through ARGS, e.g. `make gpu-check ARGS=--smoke` on a CPU.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks

# Independent readers and a real viewer for tests/test_end_to_end.py (see tests/viewers.py):
# the npm packages pinned by tests/js/package-lock.json (splat-transform, Spark, three,
# playwright-core) and Debian's Chromium, which playwright-core drives headless. Installed
# when missing and we may (root, for apt-get); otherwise those tests skip and say why.
JS := tests/js
CHROMIUM := /usr/bin/chromium
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: clean-js
test: $(JS)/node_modules/.installed $(CHROMIUM)
clean: clean-js

$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	@if ! command -v npm >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && $(APT_INSTALL) nodejs npm; fi
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(JS) --ignore-scripts --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found and not root: the viewer tests will skip"; fi

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(APT_INSTALL) chromium; \
	else echo "$(CHROMIUM) not found and not root: the Spark render tests will skip"; fi

clean-js:
	rm -rf $(JS)/node_modules

# The image built from the Dockerfile on a stand-in base and run, with jobs sent to it
# (tests/test_image.py, tests/image/). Root only: buildah and mmdebstrap are installed when
# missing and we may; otherwise the check skips and says why. `make test` runs it too (about
# 20 min from cold on 2 shared cores). The stand-in base is kept in buildah's storage for the
# next run (`make clean-image` removes it).
BUILDAH := /usr/bin/buildah
.PHONY: image-check clean-image
test: $(BUILDAH)

image-check: $(VENV)/.installed $(JS)/node_modules/.installed $(BUILDAH)
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/test_image.py

$(BUILDAH):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(APT_INSTALL) buildah mmdebstrap; \
	else echo "$(BUILDAH) not found and not root: the image check will skip"; fi

clean-image:
	cd tests && ../$(BIN)/python -c "from image import buildah; buildah.remove_images()"
