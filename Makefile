# The commands the README shows. `make install` then `make test` on a fresh machine.
PY      ?= .venv/bin/python
OMNIGLOT ?= ../shared/data/omniglot
export OMNIGLOT_DIR ?= $(abspath $(OMNIGLOT))
NPROC   ?= $(shell $(PY) -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)

.PHONY: install learners demo test test-slow test-long test-avx2 test-all lint data train-maml train-maml-multi train-elastic train-debug bench bench-data bench-dist bench-startup bench-scaling bench-train bench-recipes bench-step bench-reduce bench-invariant bench-storage bench-pool bench-backbones bench-variable bench-adapt bench-budget soak plot clean

install:               ## .venv with the pinned requirements and metadist (editable)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { echo "installing Debian's chromium (the demo's browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null || echo "no chromium: the demo's browser test needs Debian's (sudo apt-get install chromium)"

test:                  ## fast suite (a few minutes, CPU; one worker per core)
	$(PY) -m pytest -q -n auto

# two workers, a test file each at a time (its module fixtures built once; the longest files first,
# tests/conftest.py): the multi-process tests spend much of their time starting processes and
# waiting on each other, which overlaps
test-slow:             ## multi-process, resume, multi-node, tracking, real-data training (CI)
	$(PY) -m pytest -q -m "slow and not long" -n 2 --dist loadfile

test-long:             ## the slow tests' longer forms, beside CI: real-data learning, the short soak, repeats
	$(PY) -m pytest -q -m long -n 2 --dist loadfile tests

# the tests whose behaviour depends on the CPU's kernels (the plan and its measurement, exact mode,
# float32 precision, tasks at once against one at a time), again with an AVX2 machine's kernels
KERNEL_TESTS = tests/test_plan.py tests/test_exact.py tests/test_step.py \
	"tests/test_algorithms.py::test_strategies_in_float32_are_as_exact_as_the_reference_loop" \
	"tests/test_algorithms.py::test_batched_equals_loop" \
	"tests/test_train.py::test_auto_strategy_is_a_property_of_the_machine_and_the_shape" \
	"tests/test_train.py::test_exact_mode_records_its_groups_and_the_world_sizes_it_supports"
# (on a CPU without AVX-512 its own kernels are AVX2's: `make test` ran them already)
test-avx2:             ## the kernel-dependent tests under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null || [ -n "$(FORCE)" ]; then \
		ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -n auto $(KERNEL_TESTS); \
	else echo "test-avx2: this CPU has no AVX-512, so its own kernels are AVX2's and make test ran these tests on them (FORCE=1 runs them again)"; fi

test-all: test test-slow test-long

lint:                  ## ruff: lint rules and the format check (pyproject.toml)
	$(PY) -m ruff check metadist tests bench launch
	$(PY) -m ruff format --check metadist tests bench launch

data:                  ## episode shards for the default (alphabets, 5-way 1-shot) run
	$(PY) -m metadist prepare

train-maml:            ## strong.yaml: one process, local data, W&B offline
	$(PY) -m metadist train --config configs/strong.yaml

train-maml-multi:      ## strong.yaml on every GPU of this node
	$(PY) -m accelerate.commands.launch --config_file launch/accelerate/multi-gpu.yaml --num_processes $(NPROC) \
		-m metadist train --config configs/strong.yaml

train-elastic:         ## strong.yaml under torch elastic: run on every node (RDZV_ENDPOINT=head:29400, NNODES=1:4)
	RDZV_ENDPOINT=$${RDZV_ENDPOINT:-127.0.0.1:29400} bash launch/torchrun/elastic.sh --config configs/strong.yaml train.reduce=exact

# the shipped learners (metadist/learners/): a fixed step count, no time budget, W&B off, so the
# same command on the same machine gives the same bits; each run's files are copied into the package
LEARNER_ARGS = run.root=runs/learners run.fresh=true train.budget_schedule=false train.max_minutes=0 tracking.mode=disabled
LEARNER_PROTONET = metadist train --config configs/protonet.yaml run.name=protonet train.steps=3000 $(LEARNER_ARGS)
LEARNER_BOSS = metadist train --config configs/boss.yaml run.name=boss train.steps=1500 $(LEARNER_ARGS)
learners:              ## retrain the shipped learners (protonet.yaml, boss.yaml; about 15 minutes on 2 cores)
	$(PY) -m $(LEARNER_PROTONET)
	$(PY) -m metadist.learners runs/learners/protonet "$(LEARNER_PROTONET)"
	$(PY) -m $(LEARNER_BOSS)
	$(PY) -m metadist.learners runs/learners/boss "$(LEARNER_BOSS)"

demo:                  ## the teaching page on http://127.0.0.1:8765/ (the shipped learners; RUN=runs/x for yours)
	$(PY) -m metadist demo $(if $(RUN),--run $(RUN))

train-debug:
	$(PY) -m metadist train --config configs/strong.yaml --debug

bench:                 ## tasks/s of every strategy vs the reference loop, memory, reader speed, start-up time
	$(PY) bench/bench.py
	$(PY) bench/startup.py

bench-startup:         ## launch -> first meta-step, fresh and resumed (strong.yaml, prepared shards)
	$(PY) bench/startup.py

bench-scaling:         ## meta-step time vs tasks per rank, all-reduce time, predicted 1/2/4/8-device scaling
	$(PY) bench/scaling.py

bench-train:           ## whole training steps of strong.yaml at meta-batch 32 against the exercise's loop (tasks at once as auto measures)
	$(PY) bench/train_speed.py

bench-recipes:         ## the recipes as shipped (strong, boss at meta-batch 8 and 32), whole runs against the loop, natively and under the AVX2 caps
	$(PY) bench/recipes.py

bench-step:            ## a meta-step's parts (its chunks, reduction, clipping, Adam) beside the plan's measurement of a chunk
	$(PY) bench/step_parts.py

bench-reduce:          ## train.reduce=exact against fast: step time, memory, the reduction between 2 processes, 8-GPU model
	$(PY) bench/reduce.py

bench-invariant:       ## can exact mode compute a rank's whole share at once? each task's bits in groups of 1..8, folded and per-task GEMM forwards, and their speed
	$(PY) bench/invariant.py
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) bench/invariant.py
	ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default $(PY) bench/invariant.py

bench-storage:         ## 84x84 RGB episodes: bytes and decode speed of raw, PNG, source JPEG and the pool format
	$(PY) bench/storage.py

bench-pool:            ## one pool per node: PSS of 1/2/4 ranks, private memory for 0.5-4 GB pools, a pool bigger than a memory limit
	$(PY) bench/pool_memory.py

bench-backbones:       ## Conv4 and ResNet-12 at 84x84 RGB: memory per task, tasks/s, the per-80-GB-GPU projection
	$(PY) bench/backbones.py

bench-variable:        ## Meta-Dataset's episodes: memory per task at the largest, reading episodes/s, the sampler
	$(PY) bench/variable.py

bench-adapt:           ## ms to adapt to a task and to predict an image: 4 algorithms x Conv4 28/84, ResNet-12 84; eager and onnxruntime
	$(PY) bench/adapt_latency.py

bench-budget:          ## does the budget schedule's fit hold? protonet.yaml under 1, 2 and 4 minutes
	$(PY) bench/budget.py

soak:                  ## a 2-process run killed 10 times at random and relaunched: same weights at the end
	$(PY) bench/soak.py --kills 10 --steps 300

bench-data:
	$(PY) bench/bench.py --only data

bench-dist:            ## tasks/s with 1 and 2 processes on this machine, all-reduce time
	$(PY) bench/bench_dist.py

plot:
	$(PY) -m metadist plot runs/* --out curves.png

clean:
	rm -rf runs data/shards
