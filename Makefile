# The two commands a user needs: `make demo` and `make test`. Everything else is set-up they
# pull in. libtorch comes from pinned PyPI wheels, cached under ~/.cache/probe-cascade.

CARGO ?= cargo
DEMO_DIR ?= demo
DEMO_TOKENS ?= 200
BIN := target/release/probe-cascade

.PHONY: all libtorch pyenv python build build-gpu gpu-bundle test test-python demo bench fuzz clean

all: build

libtorch:
	@bash scripts/fetch-libtorch.sh

pyenv:
	@bash scripts/python-env.sh

build: libtorch
	$(CARGO) build --release

# The Python package, built with maturin against the environment's torch and installed into
# .venv/ (scripts/build-python.sh): afterwards `.venv/bin/python -c 'import probe_cascade'`.
python: pyenv
	@bash scripts/build-python.sh

# Against a full CUDA torch 2.11.0 (TORCH_DIR=... or a cached venv); see the script.
build-gpu:
	@bash scripts/build-gpu.sh

# What a GPU machine needs for scripts/gpu-check.sh (the CUDA binary, the CUDA test binaries,
# the script), in target/gpu-bundle, under 64 MiB; see scripts/gpu-bundle.sh.
gpu-bundle:
	@bash scripts/gpu-bundle.sh

test: libtorch pyenv
	$(CARGO) test --release
	@$(BIN) cpu
	@$(MAKE) --no-print-directory test-python

# From the repo root, so that `import probe_cascade` is the installed package, not python/'s
# sources. pytest's exit code 5 means it collected no tests: that is a failure here too, said plainly.
test-python: python
	@.venv/bin/python -m pytest -q -rs python/tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test-python: pytest collected no tests" >&2; exit 1; fi; exit $$rc

$(DEMO_DIR)/pack/manifest.json: | build
	$(BIN) pack synth --preset demo --out $(DEMO_DIR)/pack

$(DEMO_DIR)/trace.npy: $(DEMO_DIR)/pack/manifest.json
	$(BIN) trace synth --pack $(DEMO_DIR)/pack --tokens $(DEMO_TOKENS) --out $@

demo: build $(DEMO_DIR)/pack/manifest.json $(DEMO_DIR)/trace.npy
	$(BIN) pack inspect $(DEMO_DIR)/pack
	$(BIN) run --engine runtime --config config/realtime.toml --pack $(DEMO_DIR)/pack --trace $(DEMO_DIR)/trace.npy \
		--json $(DEMO_DIR)/run.json

bench: build
	$(CARGO) bench

# Coverage-guided fuzzing of every parser of untrusted bytes (fuzz/, scripts/fuzz.sh), with
# AFL++ through cargo-afl: FUZZ_SECONDS per target, FUZZ_JOBS targets at a time.
FUZZ_SECONDS ?= 60
FUZZ_JOBS ?= 1
fuzz:
	@FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_JOBS=$(FUZZ_JOBS) bash scripts/fuzz.sh

clean:
	$(CARGO) clean
	rm -rf $(DEMO_DIR)
