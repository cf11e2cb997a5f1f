# make demo  - set up, then certify the embedded default and print the table
# make test  - set up, then run the default test suite (no slow, no GPU tests)
# make test-gpu - the GPU tests, on a machine with a CUDA device (fails without one)
# make setup - create/update .venv (idempotent; a no-op when nothing changed)
PY := .venv/bin/python
STAMP := .venv/.densepure-setup
SETUP_INPUTS := requirements/lock.txt pyproject.toml infra/setup.sh infra/_densepure_tvfix.py infra/densepure_tvfix.pth

.PHONY: setup demo test test-slow test-gpu lock clean-results
setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	bash infra/setup.sh
	touch $@

demo: setup
	.venv/bin/densepure certify

test: setup
	$(PY) -m pytest -q --durations=20

# Slow tests (training, long certifications): run by `make test-slow`, see docs/testing.md.
test-slow: setup
	$(PY) -m pytest -q -m slow

# GPU tests (CUDA graphs, on-device noise, bf16/fp16), on a machine with a CUDA device: see
# docs/testing.md. Without one it stops with an error before pytest, never passing by skipping.
test-gpu: setup
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('test-gpu: torch ' + torch.__version__ + ' sees no CUDA device; run it on a GPU machine (docs/testing.md)')"
	$(PY) -m pytest -q -m gpu

# Re-resolve requirements/base.in into the lock. The torch pin is stored without the local
# "+cpu" tag so the same lock installs a CUDA build on GPU machines; it is put back while
# compiling, or uv would prefer the registry's CUDA torch (and ~20 nvidia packages).
lock:
	sed -i 's/^torch==\([0-9.]*\)$$/torch==\1+cpu/' requirements/lock.txt
	uv pip compile requirements/base.in --python-version 3.11 --find-links /opt/wheels -o requirements/lock.txt
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' requirements/lock.txt
	! grep -q '^nvidia-' requirements/lock.txt || { echo "lock: CUDA packages crept in" >&2; exit 1; }

clean-results:
	rm -rf results
