# The pipeline as a DAG of file targets. `make help` lists the targets (and starts no Python).
#   make demo                                   everything on a synthetic world, on CPU
#   make prepare folds train infer submit DATA_DIR=/data/siim EXP=2st_exp5
#   make train EXP=2st_exp5 FOLD=2              one fold only
# What reruns is decided in one place, pneumothorax.io.freshness: at parse time one Python call
# (pneumothorax.pipeline.make_plan) says which outputs were made under other config values or inputs
# than now (STALE); those depend on FORCE, everything else on file times. It writes nothing: make -n
# only looks. docs/pipeline.md explains it; docs/maintaining.md says how to add a step.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

EXP       ?= demo
DATA_DIR  ?= data/raw/synthetic
# The layout is found from DATA_DIR alone (docs/data.md); these override one part.
TRAIN_CSV ?=
TRAIN_DIR ?=
TEST_DIR  ?=
SAMPLE_SUBMISSION ?=
EXTRA_DIR ?=
LABELS    ?= $(DATA_DIR)/test-labels.csv
FOLD      ?=
# Config overrides for every step, as a config edit: SET="segmentation.stages.0.lr=1e-4 data.workers=8"
SET       ?=
NPROC     ?= 1
# Scaling (docs/scaling.md): GPUS=0,1,2,3 runs each GPU job on free GPUs of the list (make -j4: one fold per
# GPU); NNODES>1 trains one fold over several machines (torchrun, c10d rendezvous at RDZV_ENDPOINT);
# LAUNCH prefixes every training command (e.g. LAUNCH="srun --nodes=2 --ntasks-per-node=1").
GPUS      ?=
GPU_LOCKS ?=
NNODES    ?= 1
NODE_RANK ?=
RDZV_ENDPOINT ?=
LAUNCH    ?=
SKIP_BAD  ?=
QUIET     ?=
SYNTH_SEED  ?= 0
SYNTH_TRAIN ?= 500
SYNTH_TEST  ?= 100
SYNTH_LAYOUT ?= stage2
SYNTH_DIFFICULTY ?= default
SYNTH_KNOBS ?=

VENV     := .venv
PY       := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CONFIGS  ?= configs
CONFIG   := $(CONFIGS)/$(EXP).yaml
PROCESSED_DIR ?= data/processed/$(notdir $(abspath $(DATA_DIR)))
MODELS_DIR ?= models
SUBMISSIONS_DIR ?= submissions
PREDICTIONS_DIR ?= predictions
EXP_DIR  := $(patsubst %/,%,$(MODELS_DIR))/$(EXP)
SUBMISSION := $(SUBMISSIONS_DIR)/$(EXP).csv
PATIENT_MAP ?= $(firstword $(wildcard $(DATA_DIR)/kaggle-to-nih-id.csv) data/external/kaggle-to-nih-id.csv)
export HF_HUB_OFFLINE ?=
export PYTHONUNBUFFERED := 1

ifneq ($(origin PROCESSED)$(origin MODELS),undefinedundefined)
$(error PROCESSED and MODELS were renamed: use PROCESSED_DIR=<folder> (and MODELS_DIR=<folder> for models/))
endif

Q         := $(if $(QUIET),--quiet,)
OVERRIDES := $(foreach s,$(SET),--set $(s))
LAYOUT_ARGS := $(if $(TRAIN_CSV),--train-csv $(TRAIN_CSV)) $(if $(TEST_DIR),--test-dir $(TEST_DIR)) \
  $(if $(SAMPLE_SUBMISSION),--sample-submission $(SAMPLE_SUBMISSION)) $(if $(EXTRA_DIR),--extra-dir $(EXTRA_DIR)) \
  --patient-map $(PATIENT_MAP)
STEP_ARGS  = --config $(CONFIG) $(OVERRIDES) --processed $(PROCESSED_DIR) --exp-dir $(EXP_DIR) $(Q)

# --- the one Python start at parse time, for the goals that run pipeline steps -------------------------
PLAN_GOALS := prepare folds pretrain train train-seg train-cls oof infer search submit kaggle-submit score report ensemble
ENSEMBLE ?=
NAME     ?= ensemble
WEIGHTS  ?= equal
define newline


endef
ifneq ($(filter $(PLAN_GOALS),$(MAKECMDGOALS)),)
ifeq ($(wildcard $(PY)),)
$(error $(PY) is missing: run `make install` first (`make demo` and `make test` install it themselves))
endif
PLAN_ARGS := $(if $(filter-out ensemble,$(filter $(PLAN_GOALS),$(MAKECMDGOALS))),--config $(CONFIG) $(OVERRIDES) --exp-dir $(EXP_DIR) \
  --processed $(PROCESSED_DIR) --data-dir $(DATA_DIR) --train-dir "$(TRAIN_DIR)" $(LAYOUT_ARGS)) \
  $(if $(filter ensemble,$(MAKECMDGOALS)),--ensemble-dir $(MODELS_DIR)/$(NAME) --members "$(ENSEMBLE)" --weights $(WEIGHTS))
$(eval $(subst |NL|,$(newline),$(shell $(PY) -m pneumothorax.pipeline.make_plan $(PLAN_ARGS))))
ifneq ($(PLAN_ERROR),)
$(error $(PLAN_ERROR))
endif
endif

N_FOLDS   ?= 0
FOLDS     := $(if $(FOLD),$(FOLD),$(shell seq 0 $$(($(N_FOLDS) - 1))))
ALL_FOLDS := $(shell seq 0 $$(($(N_FOLDS) - 1)))
ifneq ($(FOLD),)
ifneq ($(filter $(PLAN_GOALS),$(MAKECMDGOALS)),)
ifeq ($(filter $(FOLD),$(ALL_FOLDS)),)
$(error FOLD=$(FOLD) is not a fold of EXP=$(EXP), whose data.n_folds is $(N_FOLDS): use FOLD=0 to FOLD=$(lastword $(ALL_FOLDS)))
endif
endif
endif
ifneq ($(filter-out 1,$(NNODES)),)
ifeq ($(RDZV_ENDPOINT),)
$(error NNODES=$(NNODES) needs RDZV_ENDPOINT=host:port, the same on every node (e.g. the first node's name and a free port))
endif
endif

# --- how a job runs: on free GPUs of the pool, under torchrun for several processes ---------------------
# One rendezvous per training job, the same on every node: e.g. demo-fold0, demo-classifier-fold0.
RDZV_ID      = $(EXP)-$(subst /,-,$(patsubst $(EXP_DIR)/%,%,$(@D)))
TORCHRUN     = $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) $(if $(filter-out 1,$(NNODES)),--nnodes=$(NNODES) \
  $(if $(NODE_RANK),--node_rank=$(NODE_RANK)) --rdzv_backend=c10d --rdzv_endpoint=$(RDZV_ENDPOINT) --rdzv_id=$(RDZV_ID),--standalone)
POOL         = $(if $(GPUS),$(PY) -m pneumothorax.pipeline.gpu_pool --gpus $(GPUS) --per-job $(1) \
  $(if $(GPU_LOCKS),--lock-dir $(GPU_LOCKS)) --)
RUN          = $(LAUNCH) $(call POOL,$(NPROC)) $(if $(filter-out 1,$(NPROC) $(NNODES)),$(TORCHRUN),$(PY))
RUN_ONE      = $(call POOL,1) $(PY)

# --- the experiment's outputs (pneumothorax.io.paths.ExperimentDir builds the same paths) ---------------
PREPARED   := $(EXP_DIR)/made/prepare.json
FOLDS_CSV  := $(EXP_DIR)/folds.csv
SEG_MODELS := $(foreach k,$(FOLDS),$(EXP_DIR)/fold$(k)/model.pt)
CLS_MODELS := $(if $(CLS_ENABLED),$(foreach k,$(FOLDS),$(EXP_DIR)/classifier/fold$(k)/model.pt))
ALL_SEG    := $(foreach k,$(ALL_FOLDS),$(EXP_DIR)/fold$(k)/model.pt)
ALL_CLS    := $(if $(CLS_ENABLED),$(foreach k,$(ALL_FOLDS),$(EXP_DIR)/classifier/fold$(k)/model.pt))
OOF        := $(EXP_DIR)/oof/summary.json
TEST_IDS   := $(EXP_DIR)/test/ids.csv
POSTPROCESS := $(EXP_DIR)/postprocess.json
SEG_INIT    = $(if $(filter classifier,$(ENC_INIT)),$(EXP_DIR)/classifier/fold%/model.pt) \
              $(if $(filter pretrain,$(ENC_INIT)),$(EXP_DIR)/pretrain/model.pt)

# Outputs made under other config values or inputs than now (freshness.stale_outputs).
ifneq ($(STALE),)
$(addprefix $(EXP_DIR)/,$(STALE)): FORCE
endif
FORCE:
# A data layout that is not found stops every step that reads the data, with its message.
layout-error:
	@echo "error: $(LAYOUT_ERROR)" >&2; exit 2
DATA_OK := $(if $(LAYOUT_ERROR),layout-error)

.PHONY: help install layout-error FORCE demo synthetic prepare folds pretrain train train-seg train-cls oof infer \
        search submit score report test test-fast lint bench bench-data bench-train bench-post clean clean-models \
        print-paths ensemble predict leaderboard ablation kaggle-submit gpu-check bench-real

help: ## list the targets
	@grep -hE '^[a-zA-Z_%/-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'
	@echo; echo "variables: EXP=$(EXP) DATA_DIR=$(DATA_DIR) FOLD=$(FOLD) NPROC=$(NPROC) PROCESSED_DIR=$(PROCESSED_DIR)"

# TORCH=cu126|cu128|cu130|cpu installs that PyTorch build from PyTorch's own index first (docs/install.md:
# the driver each needs); without it pip takes the registry's build (CUDA 13: NVIDIA driver R580 or newer).
TORCH ?=
TORCH_BUILDS := cu126 cu128 cu130 cpu
ifneq ($(TORCH),)
ifeq ($(filter $(TORCH_BUILDS),$(TORCH)),)
$(error TORCH=$(TORCH): use one of $(TORCH_BUILDS) (docs/install.md says which NVIDIA driver each needs))
endif
endif
# pip byte-compiles what it installs one file at a time (about 40 s of the install here): it installs with
# --no-compile, then compileall compiles the venv on every core (about 25 s). Files only a newer Python parses
# (torch's py312 test helpers) fail there as they do under pip, silently: -qq, and its exit status is ignored.
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile
TORCH_PINS := $(if $(TORCH),$(shell grep -E '^torch(vision)?==' requirements.txt | cut -d' ' -f1))
install: $(INSTALLED) ## make .venv with the pinned requirements and the package (editable); TORCH=cu126|cu128|cu130|cpu
$(INSTALLED): requirements.txt pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(if $(TORCH),$(PIP) $(TORCH_PINS) --index-url https://download.pytorch.org/whl/$(TORCH))
	$(PIP) -r requirements.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $@

demo: install ## the whole pipeline on a synthetic world, on CPU, in minutes
	$(MAKE) --no-print-directory synthetic EXP=demo
	$(MAKE) --no-print-directory prepare folds train infer search submit score report EXP=demo

synthetic: $(DATA_DIR)/world.json ## a synthetic world in DATA_DIR (SYNTH_SEED, SYNTH_TRAIN, SYNTH_TEST, SYNTH_LAYOUT, SYNTH_DIFFICULTY)
$(DATA_DIR)/world.json: | $(INSTALLED)
	$(PY) scripts/00_make_synthetic.py --out $(DATA_DIR) --seed $(SYNTH_SEED) --n-train $(SYNTH_TRAIN) --n-test $(SYNTH_TEST) \
	  --layout $(SYNTH_LAYOUT) --difficulty $(SYNTH_DIFFICULTY) $(SYNTH_KNOBS) $(Q)

prepare: $(PREPARED) ## DICOMs + labels -> $(PROCESSED_DIR)/metadata.csv and caches at the config's sizes
$(PREPARED): | $(INSTALLED) $(DATA_OK)
	$(PY) scripts/01_prepare.py $(STEP_ARGS) --data-dir $(DATA_DIR) $(LAYOUT_ARGS) \
	  $(foreach d,$(TRAIN_DIR),--train-dir $(d)) $(if $(SKIP_BAD),--skip-bad)

# The split belongs to the experiment; folds.csv is rewritten only when its content changes, so a folds
# edit (or new inputs) that leaves the split retrains nothing through it.
folds: $(FOLDS_CSV) ## patient-grouped, stratified folds of this experiment: models/EXP/folds.csv
$(FOLDS_CSV): | $(PREPARED)
	$(PY) scripts/02_folds.py $(STEP_ARGS)

train: train-cls train-seg ## train gate and segmenter folds that are out of date (FOLD=k for one)
train-seg: $(SEG_MODELS) ## segmentation folds only
train-cls: $(CLS_MODELS) ## classifier folds only

$(EXP_DIR)/classifier/fold%/model.pt: $(FOLDS_CSV) | $(PREPARED)
	$(RUN) scripts/03_train_classifier.py $(STEP_ARGS) --fold $*

pretrain: $(EXP_DIR)/pretrain/model.pt ## classifier on the config's classifier.external_csv (encoder_init: pretrain)
$(EXP_DIR)/pretrain/model.pt: $(EXTERNAL_CSV) | $(INSTALLED)
	$(RUN) scripts/03_train_classifier.py $(STEP_ARGS) --pretrain

$(EXP_DIR)/fold%/model.pt: $(FOLDS_CSV) $(SEG_INIT) | $(PREPARED)
	$(RUN) scripts/04_train_segmentation.py $(STEP_ARGS) --fold $*

oof: $(OOF) ## out-of-fold predictions of every fold, with the TTA of infer.tta (what search reads)
$(OOF): $(ALL_SEG) $(ALL_CLS) | $(PREPARED)
	$(RUN_ONE) scripts/05_predict_oof.py $(STEP_ARGS)

infer: $(TEST_IDS) ## test probabilities: folds ensembled, flip TTA, gate
$(TEST_IDS): $(ALL_SEG) $(ALL_CLS) | $(PREPARED) $(DATA_OK)
	$(RUN_ONE) scripts/06_infer.py $(STEP_ARGS)

search: $(POSTPROCESS) ## exact B-TH x R-TH x gate search on out-of-fold predictions -> postprocess.json
$(POSTPROCESS): $(OOF)
	$(PY) scripts/07_search_postprocess.py $(STEP_ARGS)

submit: $(SUBMISSION) ## validated submission CSV
$(SUBMISSION): $(POSTPROCESS) $(TEST_IDS)
	$(PY) scripts/08_submit.py --processed $(PROCESSED_DIR) --exp-dir $(EXP_DIR) --out $@ $(Q)

# The official CLI: on PATH, else the one make install put in .venv.
KAGGLE ?= $(or $(shell command -v kaggle),$(VENV)/bin/kaggle)
MSG    ?=
kaggle-submit: $(SUBMISSION) ## validate submissions/EXP.csv and send it to the competition: MSG='what it is'
	$(PY) scripts/15_submit_to_kaggle.py --submission $(SUBMISSION) --message "$(MSG)" --processed $(PROCESSED_DIR) \
	  --kaggle $(KAGGLE)

score: $(EXP_DIR)/score.json ## score the submission against LABELS (synthetic test labels by default)
$(EXP_DIR)/score.json: $(SUBMISSION) $(LABELS)
	$(PY) scripts/09_score.py --submission $< --labels $(LABELS) --out $@

report: $(EXP_DIR)/report/summary.md ## markdown summary and OOF case panels
$(EXP_DIR)/report/summary.md: $(POSTPROCESS)
	$(PY) scripts/10_report.py $(STEP_ARGS)

# Ensembles: the members must have been searched (make search EXP=member) and inferred (make infer).
ENSEMBLE_SUBMISSION := $(SUBMISSIONS_DIR)/$(NAME).csv
member_files = $(MODELS_DIR)/$(1)/postprocess.json $(MODELS_DIR)/$(1)/test/ids.csv
ifneq ($(filter ensemble,$(MAKECMDGOALS)),)
ifneq ($(filter-out 0 1,$(words $(ENSEMBLE))),$(words $(ENSEMBLE)))
$(error name two experiments or more: make ensemble ENSEMBLE="exp_a exp_b" NAME=ens1 (got ENSEMBLE="$(ENSEMBLE)"))
endif
ifneq ($(words $(filter equal search,$(WEIGHTS))) $(words $(WEIGHTS)),1 1)
$(error WEIGHTS=$(WEIGHTS): use WEIGHTS=equal or WEIGHTS=search)
endif
UNFINISHED := $(strip $(foreach e,$(ENSEMBLE),$(if $(filter-out $(wildcard $(call member_files,$(e))),$(call member_files,$(e))),$(e))))
ifneq ($(UNFINISHED),)
$(error ENSEMBLE member(s) $(UNFINISHED) not searched and inferred under MODELS_DIR=$(MODELS_DIR) (no postprocess.json or test/ids.csv): run make train infer search EXP=<member> for each first)
endif
endif
ensemble: $(ENSEMBLE_SUBMISSION) ## blend experiments' OOF and test maps: ENSEMBLE="a b" NAME=ens1 [WEIGHTS=search]
$(ENSEMBLE_SUBMISSION): $(foreach e,$(ENSEMBLE),$(call member_files,$(e))) $(if $(ENSEMBLE_STALE),FORCE) | $(INSTALLED)
	$(PY) scripts/11_ensemble.py --members $(ENSEMBLE) --name $(NAME) --configs-dir $(CONFIGS) --models-dir $(MODELS_DIR) \
	  --processed $(PROCESSED_DIR) --weights $(WEIGHTS) --out $@ $(if $(wildcard $(LABELS)),--labels $(LABELS)) $(Q)

# Prediction on new images with a trained experiment or ensemble (its saved post-processing decides).
INPUT     ?=
PRED_NAME ?= $(EXP)-$(notdir $(abspath $(INPUT)))
predict: | $(INSTALLED) ## new DICOM/PNG/JPEG images: INPUT=<folder> EXP=<exp or ensemble> [DICOM_SEG=1] -> predictions/<EXP>-<folder>/
	@[ -n "$(INPUT)" ] || { echo 'error: name the images: make predict INPUT=<folder> EXP=<exp or ensemble>' >&2; exit 2; }
	$(RUN_ONE) scripts/12_predict.py --exp-dir $(EXP_DIR) --input $(INPUT) --out $(PREDICTIONS_DIR)/$(PRED_NAME) \
	  $(if $(DICOM_SEG),--dicom-seg) $(Q)

leaderboard: | $(INSTALLED) ## every experiment and ensemble under MODELS_DIR, best OOF first -> models/leaderboard.md, .csv
	$(PY) scripts/13_leaderboard.py --models-dir $(MODELS_DIR)

ABLATION_WORLDS ?= 0
ABLATION_SEEDS  ?= 0 1
ABLATION_JOBS   ?= 2
ablation: | $(INSTALLED) ## the recipe's ablation on synthetic worlds -> models/EXP/ablation/ablation.md (ABLATION_WORLDS, ABLATION_SEEDS, ABLATION_JOBS)
	$(PY) scripts/14_ablation.py --config $(CONFIG) $(OVERRIDES) --out $(EXP_DIR)/ablation --worlds $(ABLATION_WORLDS) \
	  --seeds $(ABLATION_SEEDS) --n-train $(SYNTH_TRAIN) --n-test $(SYNTH_TEST) --difficulty $(SYNTH_DIFFICULTY) \
	  --jobs $(ABLATION_JOBS) $(Q)

test: install ## the whole test suite (what CI runs)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install ## the unit tests: no training, no make (under 2 minutes)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m unit

lint: install ## ruff
	$(VENV)/bin/ruff check src scripts tests benchmarks

gpu-check: install ## every risky CUDA path on a small world, PASS/FAIL/SKIP each, then bench-train (run it first on a GPU box)
	$(PY) benchmarks/gpu_check.py

REAL_DIR ?=
bench-real: install ## the real-data recipe (real_cpu and real_cpu_s1 side by side, blended; or EXP= alone, or ENSEMBLE="a b" [JOBS=2: two members at once]) on the staged real SIIM images (REAL_DIR=<stage.sh folder>), timed -> benchmarks/results/bench_real*.json
	@[ -n "$(REAL_DIR)" ] || { echo 'error: name the staged real images: make bench-real REAL_DIR=<folder stage.sh wrote>' >&2; exit 2; }
	$(PY) benchmarks/bench_real.py --real-dir $(REAL_DIR) $(if $(filter command line,$(origin EXP)),--exp $(EXP)) \
	  $(if $(ENSEMBLE),--ensemble $(ENSEMBLE) --name $(if $(filter command line,$(origin NAME)),$(NAME),real_ensemble) \
	  --jobs $(or $(JOBS),1))

bench: bench-data bench-train bench-post ## all benchmarks
bench-data: install ## RLE of the real CSV; prepare on today's layout (real DICOMs) vs a bare decode loop
	$(PY) benchmarks/bench_data.py
bench-train: install ## per recipe stage: loader rate vs workers, fp32/bf16/channels_last steps, memory, epoch and fold time
	$(PY) benchmarks/bench_train.py
bench-post: install ## grid search vs brute force; inference with and without TTA; memory
	$(PY) benchmarks/bench_post.py

print-paths: ## the paths this Makefile builds for EXP (a test compares them with pneumothorax.io.paths)
	@printf '%s\n' "models $(EXP_DIR)" "folds $(FOLDS_CSV)" "segmenter $(EXP_DIR)/fold0/model.pt" \
	  "classifier $(EXP_DIR)/classifier/fold0/model.pt" "pretrain $(EXP_DIR)/pretrain/model.pt" \
	  "oof $(OOF)" "test_ids $(TEST_IDS)" "postprocess $(POSTPROCESS)" "score $(EXP_DIR)/score.json" \
	  "summary $(EXP_DIR)/report/summary.md" "prepared $(PREPARED)" "submission $(SUBMISSION)"

clean-models: ## remove models/$(EXP) and its submission
	rm -rf $(EXP_DIR) $(SUBMISSION)
clean: ## remove all generated data, models and submissions (keeps .venv)
	rm -rf data/processed/* data/raw/synthetic models submissions/*.csv
