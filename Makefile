# The pipeline as a DAG of file targets. `make help` lists the targets.
#   make demo                                   everything on a synthetic world, on CPU
#   make prepare train infer submit DATA_DIR=/data/siim EXP=2st_exp5
#   make train EXP=2st_exp5 FOLD=2              one fold only
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

EXP       ?= demo
DATA_DIR  ?= data/raw/synthetic
# The layout is found from DATA_DIR alone (README, "Getting the data"); these override one part.
TRAIN_CSV ?=
TRAIN_DIR ?=
TEST_DIR  ?=
SAMPLE_SUBMISSION ?=
LABELS    ?= $(DATA_DIR)/test-labels.csv
FOLD      ?=
NPROC     ?= 1
# Scaling: GPUS=0,1,2,3 runs each training job on free GPUs of the list (make -j4: one fold per GPU);
# NNODES>1 trains one fold over several machines (torchrun, c10d rendezvous at RDZV_ENDPOINT);
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
PROCESSED ?= data/processed/$(notdir $(abspath $(DATA_DIR)))
MODELS_DIR ?= models
SUBMISSIONS_DIR ?= submissions
PREDICTIONS_DIR ?= predictions
MODELS   := $(MODELS_DIR)/$(EXP)
SUBMISSION := $(SUBMISSIONS_DIR)/$(EXP).csv
PATIENT_MAP ?= $(firstword $(wildcard $(DATA_DIR)/kaggle-to-nih-id.csv) data/external/kaggle-to-nih-id.csv)
export HF_HUB_OFFLINE ?=
export PYTHONUNBUFFERED := 1

# Config queries need the venv; before it exists they fall back to the defaults.
cfg = $(shell [ -x $(PY) ] && $(PY) -m pneumothorax.query $(1) --config $(CONFIG) 2>/dev/null)
N_FOLDS     := $(or $(call cfg,get data.n_folds),5)
CLS_ENABLED := $(call cfg,get classifier.enabled)
ENC_INIT    := $(call cfg,get segmentation.encoder_init)
EXTERNAL_CSV := $(filter-out none,$(call cfg,get classifier.external_csv))
FOLDS       := $(if $(FOLD),$(FOLD),$(shell seq 0 $$(($(N_FOLDS) - 1))))
ALL_FOLDS   := $(shell seq 0 $$(($(N_FOLDS) - 1)))
# One rendezvous per training job, the same on every node: e.g. demo-fold0, demo-classifier-fold0.
RDZV_ID      = $(EXP)-$(subst /,-,$(patsubst $(MODELS)/%,%,$(@D)))
TORCHRUN     = $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) $(if $(filter-out 1,$(NNODES)),--nnodes=$(NNODES) \
  $(if $(NODE_RANK),--node_rank=$(NODE_RANK)) --rdzv_backend=c10d --rdzv_endpoint=$(RDZV_ENDPOINT) --rdzv_id=$(RDZV_ID),--standalone)
POOL        := $(if $(GPUS),$(PY) -m pneumothorax.gpus --gpus $(GPUS) --per-job $(NPROC) $(if $(GPU_LOCKS),--lock-dir $(GPU_LOCKS)) --)
RUN          = $(LAUNCH) $(POOL) $(if $(filter-out 1,$(NPROC) $(NNODES)),$(TORCHRUN),$(PY))
Q           := $(if $(QUIET),--quiet,)

SEG_MODELS := $(foreach k,$(FOLDS),$(MODELS)/fold$(k)/model.pt)
CLS_MODELS := $(if $(CLS_ENABLED),$(foreach k,$(FOLDS),$(MODELS)/classifier/fold$(k)/model.pt))
ALL_SEG    := $(foreach k,$(ALL_FOLDS),$(MODELS)/fold$(k)/model.pt)
ALL_CLS    := $(if $(CLS_ENABLED),$(foreach k,$(ALL_FOLDS),$(MODELS)/classifier/fold$(k)/model.pt))
PREPARED   := $(PROCESSED)/prepared-$(EXP).stamp
FOLDS_CSV  := $(MODELS)/folds.csv
stamp       = $(MODELS)/stamps/$(1).json
made        = $(MODELS)/stamps/$(1).made
FOLDS_MADE := $(call made,folds)
# After a step, the stamp it ran under, timed as its output (see the config stamps below).
record_made = cp $(call stamp,$(1)) $(call made,$(1)).tmp && touch -r $(2) $(call made,$(1)).tmp && mv $(call made,$(1)).tmp $(call made,$(1))

ifneq ($(filter-out 1,$(NNODES)),)
ifeq ($(RDZV_ENDPOINT),)
$(error NNODES=$(NNODES) needs RDZV_ENDPOINT=host:port, the same on every node (e.g. the first node's name and a free port))
endif
endif
ifneq ($(FOLD),)
ifeq ($(filter $(FOLD),$(ALL_FOLDS)),)
$(error FOLD=$(FOLD) is not a fold of EXP=$(EXP), whose data.n_folds is $(N_FOLDS): use FOLD=0 to FOLD=$(lastword $(ALL_FOLDS)))
endif
endif

# Input manifests (files with sizes and times, label hash, layout), rewritten at parse time only
# when they change. Each experiment keeps its own record of them (stamps/inputs.json, which prepare
# depends on, and stamps/test-inputs.json, which infer depends on; kept as the config stamps below
# are), so a new test folder, an edited label file or a replaced DICOM reruns exactly what depends
# on it, and a test folder that only `make -n` saw reruns nothing once dropped.
TRAIN_INPUTS := $(PROCESSED)/inputs-train.json
TEST_INPUTS  := $(PROCESSED)/inputs-test.json
NO_DATA_GOALS := help install test test-fast lint bench bench-data bench-train bench-post clean clean-models synthetic demo print-paths \
  predict leaderboard ensemble ablation
ifneq ($(filter-out $(NO_DATA_GOALS),$(or $(MAKECMDGOALS),help)),)
# The steps' inputs and stamps come from the venv's Python, at parse time (below: both need it).
ifeq ($(wildcard $(PY)),)
$(error $(PY) is missing: run `make install` first (`make demo` and `make test` install it themselves))
endif
MANIFEST_ERROR := $(shell $(PY) -m pneumothorax.query manifest --data-dir $(DATA_DIR) \
  --processed $(PROCESSED) --patient-map $(PATIENT_MAP) $(if $(TRAIN_CSV),--train-csv $(TRAIN_CSV)) \
  $(if $(TRAIN_DIR),--train-dir "$(TRAIN_DIR)") $(if $(TEST_DIR),--test-dir $(TEST_DIR)) \
  $(if $(SAMPLE_SUBMISSION),--sample-submission $(SAMPLE_SUBMISSION)))
endif
# Config stamps: the resolved value of each config section (pneumothorax.config.SECTIONS),
# rewritten at parse time only when it changes. Each step depends on the sections it reads, so
# an edited postprocess reruns search and submit only, and an edited comment reruns nothing.
# Each training run has its own copy (stamps/segmentation-fold0.json) with the training inputs'
# hash (pneumothorax.manifest.digest), which its fingerprint holds too: a replaced training DICOM
# retrains even where the split stays; the data folder moved with its times retrains nothing. A
# stamp newer than what it built but holding the values that was built under (an edit reverted,
# one only `make -n` saw, a folds step that left the split) takes that output's time, so the step
# is neither planned nor invoked again: each step records the stamp it ran under (record_made:
# stamps/prepare.made and inputs.made, folds.made, infer.made and test-inputs.made,
# postprocess.made), each training run its trained_under.json.
ifneq ($(filter-out $(NO_DATA_GOALS),$(or $(MAKECMDGOALS),help)),)
STAMP_ERROR := $(shell $(PY) -m pneumothorax.query stamps --config $(CONFIG) --exp-dir $(MODELS) --processed $(PROCESSED))
ifneq ($(STAMP_ERROR),)
$(error $(STAMP_ERROR))
endif
endif
LAYOUT_ARGS := $(if $(TRAIN_CSV),--train-csv $(TRAIN_CSV)) $(foreach d,$(TRAIN_DIR),--train-dir $(d)) \
  $(if $(TEST_DIR),--test-dir $(TEST_DIR)) $(if $(SAMPLE_SUBMISSION),--sample-submission $(SAMPLE_SUBMISSION))

.PHONY: help install layout-error demo synthetic prepare folds pretrain train train-seg train-cls infer search submit score report \
        test test-fast lint bench bench-data bench-train bench-post clean clean-models print-paths ensemble predict \
        leaderboard ablation

help: ## list the targets
	@grep -hE '^[a-zA-Z_%/-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'
	@echo; echo "variables: EXP=$(EXP) DATA_DIR=$(DATA_DIR) FOLD=$(FOLD) NPROC=$(NPROC) PROCESSED=$(PROCESSED)"

install: $(INSTALLED) ## make .venv with the pinned requirements and the package (editable)
$(INSTALLED): requirements.txt pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v 'is ignored' >&2)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	touch $@

demo: install ## the whole pipeline on a synthetic world, on CPU, in minutes
	$(MAKE) --no-print-directory synthetic EXP=demo
	$(MAKE) --no-print-directory prepare folds train infer search submit score report EXP=demo

synthetic: $(DATA_DIR)/world.json ## a synthetic world in DATA_DIR (SYNTH_SEED, SYNTH_TRAIN, SYNTH_TEST, SYNTH_LAYOUT, SYNTH_DIFFICULTY)
$(DATA_DIR)/world.json: | $(INSTALLED)
	$(PY) scripts/00_make_synthetic.py --out $(DATA_DIR) --seed $(SYNTH_SEED) --n-train $(SYNTH_TRAIN) --n-test $(SYNTH_TEST) \
	  --layout $(SYNTH_LAYOUT) --difficulty $(SYNTH_DIFFICULTY) $(SYNTH_KNOBS) $(Q)

$(TRAIN_INPUTS) $(TEST_INPUTS):
	@echo "error: $(or $(MANIFEST_ERROR),$@ is missing: cannot tell which inputs DATA_DIR=$(DATA_DIR) holds)" >&2; exit 2
# A layout error (a mistyped TEST_DIR, say) stops every step that reads the data, with its message,
# and leaves the last good layout's manifests: the corrected command then reruns nothing.
LAYOUT_ERROR := $(if $(MANIFEST_ERROR),layout-error)
layout-error:
	@echo "error: $(MANIFEST_ERROR)" >&2; exit 2

prepare: $(PREPARED) ## DICOMs + labels -> $(PROCESSED)/metadata.csv and caches at the config's sizes
$(PREPARED): $(call stamp,inputs) $(call stamp,prepare) | $(TRAIN_INPUTS) $(TEST_INPUTS) $(INSTALLED) $(LAYOUT_ERROR)
	$(PY) scripts/01_prepare.py --config $(CONFIG) --data-dir $(DATA_DIR) --out $(PROCESSED) --patient-map $(PATIENT_MAP) \
	  $(LAYOUT_ARGS) $(if $(SKIP_BAD),--skip-bad) $(Q)
	touch $@ && $(call record_made,prepare,$@) && $(call record_made,inputs,$@)

# Folds belong to the experiment and follow the training inputs (their hash is in the folds'
# stamp; not metadata.csv, which a new test folder changes too). folds.csv is rewritten only when
# its content changes, so a folds edit or new inputs that leave the split retrain nothing through
# it (new inputs retrain every run through the runs' own stamps). folds.made holds the stamp it
# split under, timed as folds.csv (see the config stamps above).
folds: $(FOLDS_CSV) ## patient-grouped, stratified folds of this experiment: models/EXP/folds.csv
$(FOLDS_CSV): $(FOLDS_MADE) ;
$(FOLDS_MADE): $(call stamp,folds) | $(PREPARED)
	$(PY) scripts/02_folds.py --config $(CONFIG) --processed $(PROCESSED) --exp-dir $(MODELS)
	$(call record_made,folds,$(FOLDS_CSV))

train: train-cls train-seg ## train gate and segmenter folds that are out of date (FOLD=k for one)
train-seg: $(SEG_MODELS) ## segmentation folds only
train-cls: $(CLS_MODELS) ## classifier folds only

$(MODELS)/classifier/fold%/model.pt: $(call stamp,classifier-fold%) $(FOLDS_CSV) | $(PREPARED)
	$(RUN) scripts/03_train_classifier.py --config $(CONFIG) --fold $* --processed $(PROCESSED) --exp-dir $(MODELS) $(Q)

pretrain: $(MODELS)/pretrain/model.pt ## classifier on the config's classifier.external_csv (encoder_init: pretrain)
$(MODELS)/pretrain/model.pt: $(call stamp,classifier-pretrain) $(EXTERNAL_CSV) | $(INSTALLED)
	$(RUN) scripts/03_train_classifier.py --config $(CONFIG) --pretrain --exp-dir $(MODELS) $(Q)

SEG_INIT = $(if $(filter classifier,$(ENC_INIT)),$(MODELS)/classifier/fold%/model.pt) \
           $(if $(filter pretrain,$(ENC_INIT)),$(MODELS)/pretrain/model.pt)
$(MODELS)/fold%/model.pt: $(call stamp,segmentation-fold%) $(FOLDS_CSV) $(SEG_INIT) | $(PREPARED)
	$(RUN) scripts/04_train_segmentation.py --config $(CONFIG) --fold $* --processed $(PROCESSED) --exp-dir $(MODELS) $(Q)

infer: $(MODELS)/test/ids.csv ## test probabilities: folds ensembled, flip TTA, gate
$(MODELS)/test/ids.csv: $(ALL_SEG) $(ALL_CLS) $(call stamp,test-inputs) $(call stamp,infer) | $(PREPARED)
	$(PY) scripts/05_infer.py --config $(CONFIG) --processed $(PROCESSED) --exp-dir $(MODELS) $(Q)
	$(call record_made,infer,$@) && $(call record_made,test-inputs,$@)

search: $(MODELS)/thresholds.json ## exact B-TH x R-TH x gate search on out-of-fold predictions
$(MODELS)/thresholds.json: $(ALL_SEG) $(ALL_CLS) $(call stamp,postprocess)
	$(PY) scripts/06_search_thresholds.py --config $(CONFIG) --processed $(PROCESSED) --exp-dir $(MODELS) $(Q)
	$(call record_made,postprocess,$@)

submit: $(SUBMISSION) ## validated submission CSV
$(SUBMISSION): $(MODELS)/thresholds.json $(MODELS)/test/ids.csv
	$(PY) scripts/07_submit.py --processed $(PROCESSED) --exp-dir $(MODELS) --out $@ $(Q)

score: $(MODELS)/score.json ## score the submission against LABELS (synthetic test labels by default)
$(MODELS)/score.json: $(SUBMISSION) $(LABELS)
	$(PY) scripts/08_score.py --submission $< --labels $(LABELS) --out $@

report: $(MODELS)/report/summary.md ## markdown summary and OOF case panels
$(MODELS)/report/summary.md: $(MODELS)/thresholds.json
	$(PY) scripts/09_report.py --config $(CONFIG) --processed $(PROCESSED) --exp-dir $(MODELS)

# Ensembles: the members must have been searched (make search EXP=member) and inferred (make infer).
ENSEMBLE ?=
NAME     ?= ensemble
WEIGHTS  ?= equal
ENSEMBLE_SUBMISSION := $(SUBMISSIONS_DIR)/$(NAME).csv
member_files = $(MODELS_DIR)/$(1)/thresholds.json $(MODELS_DIR)/$(1)/test/ids.csv
ifneq ($(filter ensemble,$(MAKECMDGOALS)),)
ifneq ($(filter-out 0 1,$(words $(ENSEMBLE))),$(words $(ENSEMBLE)))
$(error name two experiments or more: make ensemble ENSEMBLE="exp_a exp_b" NAME=ens1 (got ENSEMBLE="$(ENSEMBLE)"))
endif
ifneq ($(words $(filter equal search,$(WEIGHTS))) $(words $(WEIGHTS)),1 1)
$(error WEIGHTS=$(WEIGHTS): use WEIGHTS=equal or WEIGHTS=search)
endif
UNFINISHED := $(strip $(foreach e,$(ENSEMBLE),$(if $(filter-out $(wildcard $(call member_files,$(e))),$(call member_files,$(e))),$(e))))
ifneq ($(UNFINISHED),)
$(error ENSEMBLE member(s) $(UNFINISHED) not searched and inferred under MODELS_DIR=$(MODELS_DIR) (no thresholds.json or test/ids.csv): run make train infer search EXP=<member> for each first)
endif
# the members and WEIGHTS, so that another list or weight mode under the same NAME rebuilds it
ENSEMBLE_STAMP_ERROR := $(shell $(PY) -m pneumothorax.query ensemble --exp-dir $(MODELS_DIR)/$(NAME) \
  --members "$(ENSEMBLE)" --weights $(WEIGHTS) 2>&1)
ifneq ($(ENSEMBLE_STAMP_ERROR),)
$(error $(ENSEMBLE_STAMP_ERROR))
endif
endif
ensemble: $(ENSEMBLE_SUBMISSION) ## blend experiments' OOF and test maps: ENSEMBLE="a b" NAME=ens1 [WEIGHTS=search]
$(ENSEMBLE_SUBMISSION): $(foreach e,$(ENSEMBLE),$(call member_files,$(e))) $(MODELS_DIR)/$(NAME)/stamps/ensemble.json \
  | $(INSTALLED)
	$(PY) scripts/10_ensemble.py --members $(ENSEMBLE) --name $(NAME) --configs-dir $(CONFIGS) --models-dir $(MODELS_DIR) \
	  --processed $(PROCESSED) --weights $(WEIGHTS) --out $@ $(if $(wildcard $(LABELS)),--labels $(LABELS)) $(Q)

# Prediction on new images with a trained experiment or ensemble (its saved post-processing decides).
INPUT     ?=
PRED_NAME ?= $(EXP)-$(notdir $(abspath $(INPUT)))
predict: | $(INSTALLED) ## new DICOM/PNG/JPEG images: INPUT=<folder> EXP=<exp or ensemble> [DICOM_SEG=1] -> predictions/<EXP>-<folder>/
	@[ -n "$(INPUT)" ] || { echo 'error: name the images: make predict INPUT=<folder> EXP=<exp or ensemble>' >&2; exit 2; }
	$(PY) scripts/11_predict.py --exp-dir $(MODELS) --input $(INPUT) --out $(PREDICTIONS_DIR)/$(PRED_NAME) $(if $(DICOM_SEG),--dicom-seg) $(Q)

ABLATION_WORLDS ?= 0
ABLATION_SEEDS  ?= 0 1
ABLATION_JOBS   ?= 2
ablation: | $(INSTALLED) ## the recipe's ablation on synthetic worlds -> models/EXP/ablation/ablation.md (ABLATION_WORLDS, ABLATION_SEEDS, ABLATION_JOBS)
	$(PY) scripts/13_ablation.py --config $(CONFIG) --out $(MODELS)/ablation --worlds $(ABLATION_WORLDS) \
	  --seeds $(ABLATION_SEEDS) --n-train $(SYNTH_TRAIN) --n-test $(SYNTH_TEST) --difficulty $(SYNTH_DIFFICULTY) --jobs $(ABLATION_JOBS) $(Q)

leaderboard: | $(INSTALLED) ## every experiment and ensemble under MODELS_DIR, best OOF first -> models/leaderboard.md, .csv
	$(PY) scripts/12_leaderboard.py --models-dir $(MODELS_DIR)

test: install ## the test suite (what CI runs)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install ## tests without the slow end-to-end ones
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: install ## ruff
	$(VENV)/bin/ruff check src scripts tests benchmarks

bench: bench-data bench-train bench-post ## all benchmarks
bench-data: install ## RLE of the real CSV; prepare on today's layout (real DICOMs) vs a bare decode loop
	$(PY) benchmarks/bench_data.py
bench-train: install ## per recipe stage: loader rate vs workers, fp32/bf16/channels_last steps, memory, epoch and fold time
	$(PY) benchmarks/bench_train.py
bench-post: install ## grid search vs brute force; inference with and without TTA; memory
	$(PY) benchmarks/bench_post.py

print-paths: ## the paths this Makefile builds for EXP (a test compares them with pneumothorax.paths)
	@printf '%s\n' "models $(MODELS)" "folds $(FOLDS_CSV)" "segmenter $(MODELS)/fold0/model.pt" \
	  "classifier $(MODELS)/classifier/fold0/model.pt" "pretrain $(MODELS)/pretrain/model.pt" \
	  "test_ids $(MODELS)/test/ids.csv" "postprocess $(MODELS)/thresholds.json" "score $(MODELS)/score.json" \
	  "summary $(MODELS)/report/summary.md" "stamp $(call stamp,infer)" "prepared $(PREPARED)" \
	  "inputs $(TRAIN_INPUTS)" "submission $(SUBMISSION)"

clean-models: ## remove models/$(EXP) and its submission
	rm -rf $(MODELS) $(SUBMISSION)
clean: ## remove all generated data, models and submissions (keeps .venv)
	rm -rf data/processed/* data/raw/synthetic models submissions/*.csv
