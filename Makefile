# `make demo` and `make test` set everything up on a fresh machine (see README).
PYTHON_VENV := .venv/bin/python

.PHONY: setup test test-fast lint demo compare demo-neural env clean

setup:
	@bash tools/setup_env.sh

lint: setup
	$(PYTHON_VENV) -m ruff check objguided_d2 tools datasets tests benchmarks setup.py

test: lint
	$(PYTHON_VENV) -m pytest tests

# The unit tests alone: without the end-to-end tests that train, evaluate, predict or benchmark
# real models or launch processes (marked slow). `make test`, what CI runs, runs them all.
test-fast: setup
	$(PYTHON_VENV) -m pytest tests -m "not slow"

env: setup
	$(PYTHON_VENV) -m objguided_d2.env

# The main job: train ObjGuided from scratch on the nuclei bundled with the package on the CPU,
# evaluate it on their validation images with every metric (printed table), then segment those
# images: label TIFFs, overlays (instances scoring at least TEST.BIO_SCORE_THRESH, 0.3), COCO JSON.
# Idle OpenMP threads sleep instead of spinning: spinning threads on a busy CPU run many times
# slower.
RUN := OMP_WAIT_POLICY=PASSIVE $(PYTHON_VENV)
# Training runs as two processes of two images each where there are two cores: the per-object
# mask branch is many small operations that a second thread hardly speeds up (measured on 2
# cores: 2.5 s per iteration against 4.2 s for one process with two threads).
TRAIN := $(RUN) tools/train_net.py --num-gpus $(shell [ $$(nproc) -ge 2 ] && echo 2 || echo 1)
# Extra config overrides (KEY VALUE ...) for every command of demo, compare and demo-neural.
OPTS :=
DEMO_CONFIG := configs/compact/dsb2018_mini_objguided.yaml
DEMO_DIR := output/demo
DEMO_EVALUATION := $(DEMO_DIR)/inference/dsb2018_mini_val/evaluation.json
DEMO_TRAIN := $(TRAIN) --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_DIR) $(OPTS)
demo: setup
	$(DEMO_TRAIN)
	$(RUN) tools/predict.py --config-file $(DEMO_CONFIG) --weights $(DEMO_DIR)/model_final.pth \
		--dataset dsb2018_mini_val --output $(DEMO_DIR)/predictions --score-threshold 0.3 $(OPTS)
	@echo "Outputs of make demo:"
	@echo "  training log and metrics: $(DEMO_DIR)/log.txt, $(DEMO_DIR)/metrics.json"
	@echo "  evaluation (every metric): $(DEMO_EVALUATION)"
	@echo "  predictions: $(DEMO_DIR)/predictions/ (*_labels.tif, *_overlay.png, *_predictions.json, predictions.json)"

# Mask R-CNN and PointRend trained on the same bundled nuclei with the same recipe, budget and
# evaluators; reuses the ObjGuided run of `make demo` when it is there. Writes the side-by-side
# table, the AP-vs-IoU plot and figure.png: for the validation image with the most nuclei of each
# imaging kind (fluorescence 256 px, larger fluorescence, histology, brightfield), the image,
# its ground truth and each method's predictions.
COMPARE_DIR := output/compare
FIGURE_IMAGES := c53326fe 07fb37aa f952cc65 8f94a80b
compare: setup
	@if [ -f $(DEMO_EVALUATION) ]; then echo "Reusing the ObjGuided run of make demo ($(DEMO_DIR))"; \
	else $(DEMO_TRAIN); fi
	$(TRAIN) --config-file configs/compact/dsb2018_mini_pointrend.yaml \
		OUTPUT_DIR $(COMPARE_DIR)/pointrend $(OPTS)
	$(TRAIN) --config-file configs/compact/dsb2018_mini_mask_rcnn.yaml \
		OUTPUT_DIR $(COMPARE_DIR)/mask_rcnn $(OPTS)
	$(RUN) tools/compare.py ObjGuided=$(DEMO_DIR) PointRend=$(COMPARE_DIR)/pointrend \
		"Mask R-CNN=$(COMPARE_DIR)/mask_rcnn" --output $(COMPARE_DIR) \
		--figure-images $(FIGURE_IMAGES)

# The synthetic neural-like cells (thin, branching protrusions): ObjGuided's compact recipe at
# half its schedule, evaluated and predicted as the demo (at the config's TEST.BIO_SCORE_THRESH:
# its scores are keypoint score times mask confidence^4).
NEURAL_CONFIG := configs/compact/synthetic_neural_objguided.yaml
NEURAL_DIR := output/demo_neural
demo-neural: setup
	$(TRAIN) --config-file $(NEURAL_CONFIG) \
		SOLVER.MAX_ITER 400 SOLVER.STEPS "(267, 356)" OUTPUT_DIR $(NEURAL_DIR) $(OPTS)
	$(RUN) tools/predict.py --config-file $(NEURAL_CONFIG) --weights $(NEURAL_DIR)/model_final.pth \
		--dataset synthetic_neural_val --output $(NEURAL_DIR)/predictions --score-threshold 0.05 $(OPTS)
	@echo "Outputs: $(NEURAL_DIR)/inference/synthetic_neural_val/evaluation.json, $(NEURAL_DIR)/predictions/"

clean:
	rm -rf .venv output
