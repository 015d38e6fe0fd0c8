# The two commands a user needs: `make demo` and `make test`. Everything else is set-up they
# pull in. libtorch comes from pinned PyPI wheels, cached under ~/.cache/probe-cascade.

CARGO ?= cargo
DEMO_DIR ?= demo
DEMO_TOKENS ?= 200
BIN := target/release/probe-cascade

.PHONY: all libtorch pyenv build build-gpu test demo bench clean

all: build

libtorch:
	@bash scripts/fetch-libtorch.sh

pyenv:
	@bash scripts/python-env.sh

build: libtorch
	$(CARGO) build --release

# Against a full CUDA torch 2.11.0 (TORCH_DIR=... or a cached venv); see the script.
build-gpu:
	@bash scripts/build-gpu.sh

test: libtorch pyenv
	$(CARGO) test --release
	@$(BIN) cpu

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

clean:
	$(CARGO) clean
	rm -rf $(DEMO_DIR)
