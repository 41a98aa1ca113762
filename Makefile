# `make demo` and `make test` set everything up on a fresh machine (see README).
PYTHON_VENV := .venv/bin/python

.PHONY: setup test test-fast lint demo env clean

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

# The main job: train ObjGuided on synthetic neural-like cells on the CPU, evaluate it with every
# metric (printed table), then predict the validation images: label TIFFs, overlays, COCO JSON.
# The compact CPU recipe at half its schedule. Idle OpenMP threads sleep instead of spinning:
# spinning threads on a busy CPU run many times slower.
DEMO_CONFIG := configs/compact/synthetic_neural_objguided.yaml
DEMO_SCHEDULE := SOLVER.MAX_ITER 400 SOLVER.STEPS "(267, 356)"
DEMO_DIR := output/demo
demo: setup
	OMP_WAIT_POLICY=PASSIVE $(PYTHON_VENV) tools/train_net.py --config-file $(DEMO_CONFIG) \
		$(DEMO_SCHEDULE) OUTPUT_DIR $(DEMO_DIR)
	OMP_WAIT_POLICY=PASSIVE $(PYTHON_VENV) tools/predict.py --config-file $(DEMO_CONFIG) \
		--weights $(DEMO_DIR)/model_final.pth --dataset synthetic_neural_val \
		--output $(DEMO_DIR)/predictions
	@echo "Training log and metrics: $(DEMO_DIR)/log.txt, $(DEMO_DIR)/metrics.json (TensorBoard events alongside)"
	@echo "Evaluation: $(DEMO_DIR)/inference/synthetic_neural_val/evaluation.json"
	@echo "Predictions: $(DEMO_DIR)/predictions/ (*_labels.tif, *_overlay.png, predictions.json)"

clean:
	rm -rf .venv output
