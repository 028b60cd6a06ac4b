# Set-up, demo, tests and benchmarks. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3.11
VENV := .venv
PY := $(CURDIR)/$(VENV)/bin/python
STAMP := $(VENV)/.installed
# The shared data folder (ISBI 2012, DICOM samples); tests that need it skip without it.
export UNET_SHARED_DATA ?= $(abspath $(CURDIR)/../shared/data)
# Debian packages the tests need; `system-deps` installs those missing (needs root and apt).
# Orthanc (the DICOMweb tests start their own on 127.0.0.1) is installed without starting its service.
DEBIAN_PACKAGES := dcm2niix dicom3tools orthanc orthanc-dicomweb plastimatch chromium nodejs
DEMO := $(CURDIR)/demo_output
ISBI_BUNDLE := bundles/unet2d_isbi2012
TUMOR_BUNDLE := bundles/unet3d_tumor
BRAIN_BUNDLE := bundles/unet3d_brain_tumor
DEMO_DATA := $(CURDIR)/demo_data
DEMO_MANIFEST := $(CURDIR)/data_manifests/demo_tumor.json
DEMO_BRAIN := $(CURDIR)/demo_brain
DEMO_BRAIN_MANIFEST := $(CURDIR)/data_manifests/demo_brain.json
# minutes of demo training: epochs of 24 iterations (about 45 s each on 2 cores)
DEMO_EPOCHS ?= 3
PYTEST_ARGS ?=
# MONAI Label lives in its own environment: 0.8.5 needs pydicom 2 (the project uses pydicom 3)
LABEL_VENV := .venv-label
LABEL_PY := $(CURDIR)/$(LABEL_VENV)/bin/python
LABEL_STAMP := $(LABEL_VENV)/.installed
LABEL_APP ?= $(CURDIR)/label_app
STUDIES ?=
PORT ?= 8000
LABEL_ARGS ?=
export UNET_LABEL_PYTHON := $(LABEL_PY)

.PHONY: help venv web-deps label-venv label-server system-deps test docs demo demo-data demo-brain demo-isbi bench clean

help:
	@echo "make demo   - create .venv, install, generate the demo data, train the 3D tumor bundle, run the batch jobs (tumor, brain)"
	@echo "make demo-data - write the synthetic tumor data set to demo_data/ (and its manifest)"
	@echo "make demo-brain - write the synthetic multi-parametric brain tumor studies to demo_brain/ (and manifest)"
	@echo "make demo-isbi - train and run the U-Net ISBI 2012 bundle on ../shared/data/isbi2012"
	@echo "make test   - create/refresh .venv and run the test suite (all but GPU tests)"
	@echo "make bench  - benchmarks, with ratios against the peer measured in the same run"
	@echo "make docs   - build the documentation site into site/ (strict: broken links fail)"
	@echo "make label-server STUDIES=<folder | DICOMweb URL> [PORT=8000] - serve the bundles from MONAI Label on 127.0.0.1"

# torch==2.13.0 first: that exact version is the local CPU build; anything that asks for torch later
# finds it satisfied instead of pulling a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(STAMP)

# NiiVue for the case pages (package.json pins it; `npm ci` installs exactly the lock file). The batch
# job copies its browser build into each run's output, so the pages need nothing from the internet.
WEB_STAMP := node_modules/.installed
$(WEB_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js with npm (Debian: apt-get install nodejs npm)"; exit 1; }
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

web-deps: $(WEB_STAMP)

# the order and the reasons are in pipelines/label/requirements.txt
$(LABEL_STAMP): pyproject.toml pipelines/label/requirements.txt
	test -x $(LABEL_PY) || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --quiet torch==2.13.0
	$(LABEL_PY) -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	$(LABEL_PY) -m pip install --quiet -r pipelines/label/requirements.txt
	$(LABEL_PY) -m pip install --quiet --no-deps -e .
	touch $@

label-venv: $(LABEL_STAMP)

label-server: $(LABEL_STAMP)
	@if [ -z "$(STUDIES)" ]; then \
		echo "usage: make label-server STUDIES=<folder of NIfTI images | DICOMweb URL> [PORT=8000]"; exit 2; fi
	$(LABEL_PY) -m pipelines label-server --studies "$(STUDIES)" --port $(PORT) --app-dir $(LABEL_APP) \
		--bundles-dir $(CURDIR)/bundles $(LABEL_ARGS)

system-deps:
	@missing=""; for pkg in $(DEBIAN_PACKAGES); do \
		dpkg -s "$$pkg" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		blocker=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && blocker=1; fi; \
		status=0; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || status=$$?; \
		if [ -n "$$blocker" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		exit $$status; \
	fi

test: $(STAMP) $(LABEL_STAMP) system-deps web-deps demo-data demo-brain docs
	$(PY) -m pytest -m "not gpu" --durations=30 $(PYTEST_ARGS)

# --strict: a broken link, a missing anchor or a docstring naming a parameter the code lacks fails the
# build. The environment variables silence the theme's and MkDocs' notices about their successors.
docs: $(STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

demo: $(STAMP) web-deps demo-data demo-brain
	@echo "== demo 1/5: train the 3D tumor bundle for $(DEMO_EPOCHS) epochs (from scratch, tracked in MLflow) =="
	rm -rf $(DEMO)/tumor/models
	cd $(TUMOR_BUNDLE) && $(PY) -m monai.bundle run training --meta_file configs/metadata.json \
		--config_file configs/train.json --logging_file configs/logging.conf --tracking mlflow \
		--max_epochs $(DEMO_EPOCHS) --val_interval $(DEMO_EPOCHS) \
		--ckpt_dir $(DEMO)/tumor/models --output_dir $(DEMO)/tumor/mlflow
	@echo "== demo 2/5: the batch job: segment the 8 test DICOM studies with the shipped weights =="
	$(PY) -m pipelines batch --bundle $(TUMOR_BUNDLE) --input $(DEMO_MANIFEST) --dataset-dir $(DEMO_DATA) \
		--section test --output $(DEMO)/tumor/batch
	@echo "== demo 3/5: evaluate the shipped weights on the 8 validation cases =="
	cd $(TUMOR_BUNDLE) && $(PY) -m monai.bundle run --meta_file configs/metadata.json \
		--config_file "['configs/train.json','configs/evaluate.json']" --logging_file configs/logging.conf \
		--output_dir $(DEMO)/tumor/evaluation
	@echo "== demo 4/5: the brain tumor bundle on the 3 test MR studies (six series each, one lacks T1c) =="
	$(PY) -m pipelines batch --bundle $(BRAIN_BUNDLE) --input $(DEMO_BRAIN_MANIFEST) --dataset-dir $(DEMO_BRAIN) \
		--section test --image-key study --output $(DEMO)/brain/batch
	@echo "== demo 5/5: one patient scanned twice: the follow-up compared with the baseline (lesion growth, a new lesion) =="
	$(PY) -m pipelines batch --bundle $(TUMOR_BUNDLE) --input $(DEMO_DATA)/follow_up/dicom --output $(DEMO)/follow_up
	@echo
	@echo "Validation Dice of the shipped weights ($(DEMO)/tumor/evaluation/metrics.csv):"
	@cat $(DEMO)/tumor/evaluation/metrics.csv
	@echo "Batch job report (volumes, Dice against the demo labels, QC pictures): $(DEMO)/tumor/batch/report.html"
	@echo "Per study: $(DEMO)/tumor/batch/<case>/{index.html,mask.nii.gz,seg.dcm,sr.dcm,qc.png,record.json}; index.html scrolls the study with its segmentation"
	@echo "Validation overlays (reference | prediction): $(DEMO)/tumor/evaluation/overlays/"
	@echo "Demo training: weights $(DEMO)/tumor/models/model.pt, resumable state $(DEMO)/tumor/models/last_checkpoint_*.pt"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/tumor/mlflow/mlruns.db --host 127.0.0.1"
	@echo "Brain tumor studies (WT/TC/ET volumes, lesions, registration per series, FLAIR and T1c QC): $(DEMO)/brain/batch/report.html"
	@echo "Follow-up (change since the prior study, volumes over time): $(DEMO)/follow_up/report.html"

# regenerated only when the generator changes (or the folder is gone)
demo-data: $(DEMO_DATA)/.written

$(DEMO_DATA)/.written: $(STAMP) pipelines/demo/synthetic.py pipelines/demo/dataset.py pipelines/io/writers.py
	@echo "== write the synthetic tumor data set to $(DEMO_DATA) =="
	$(PY) -m pipelines demo-data --out $(DEMO_DATA) --manifest $(DEMO_MANIFEST)
	touch $@

demo-brain: $(DEMO_BRAIN)/.written

$(DEMO_BRAIN)/.written: $(STAMP) pipelines/demo/brain.py pipelines/demo/brain_dataset.py pipelines/demo/dataset.py pipelines/io/writers.py
	@echo "== write the synthetic brain tumor studies to $(DEMO_BRAIN) =="
	$(PY) -m pipelines demo-brain --out $(DEMO_BRAIN) --manifest $(DEMO_BRAIN_MANIFEST)
	touch $@

demo-isbi: $(STAMP)
	@if [ ! -f "$(UNET_SHARED_DATA)/isbi2012/train/image/0.png" ]; then \
		echo "The demo needs the ISBI 2012 EM data set: the U-Net paper's data, from the ISBI 2012 EM"; \
		echo "segmentation challenge (Cardona et al. 2010), expected at"; \
		echo "  $(UNET_SHARED_DATA)/isbi2012/{train/image,train/label,test}/N.png"; \
		echo "It ships in the shared data folder beside this repository (../shared/data);"; \
		echo "set UNET_SHARED_DATA to use another copy of that folder."; \
		exit 1; \
	fi
	@echo "== 1/3 train the ISBI 2012 bundle briefly (from scratch, tracked in MLflow) =="
	cd $(ISBI_BUNDLE) && $(PY) -m monai.bundle run training --meta_file configs/metadata.json \
		--config_file configs/train.json --logging_file configs/logging.conf --tracking mlflow \
		--epoch_length 25 --max_epochs 2 --ckpt_dir $(DEMO)/isbi2012/models --output_dir $(DEMO)/isbi2012/mlflow
	@echo "== 2/3 segment the 30 challenge test slices with the shipped weights =="
	cd $(ISBI_BUNDLE) && $(PY) -m monai.bundle run --meta_file configs/metadata.json \
		--config_file configs/inference.json --logging_file configs/logging.conf \
		--output_dir $(DEMO)/isbi2012/test_segmentations
	@echo "== 3/3 evaluate the shipped weights on the validation slices (20-23) =="
	cd $(ISBI_BUNDLE) && $(PY) -m monai.bundle run --meta_file configs/metadata.json \
		--config_file "['configs/train.json','configs/evaluate.json']" --logging_file configs/logging.conf \
		--output_dir $(DEMO)/isbi2012/evaluation
	@echo
	@echo "Validation metrics of the shipped weights ($(DEMO)/isbi2012/evaluation/metrics.csv):"
	@cat $(DEMO)/isbi2012/evaluation/metrics.csv
	@echo "Segmentations (255 = cell, 0 = membrane) and membrane probabilities: $(DEMO)/isbi2012/test_segmentations/"
	@echo "Demo training weights: $(DEMO)/isbi2012/models/model.pt"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/isbi2012/mlflow/mlruns.db --host 127.0.0.1"

bench: $(STAMP) demo-data demo-brain
	$(PY) benchmarks/bench_unet.py
	$(PY) benchmarks/bench_io.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_training.py --data $(DEMO_DATA)
	$(PY) benchmarks/bench_batch.py --data $(DEMO_DATA)
	$(PY) benchmarks/bench_brain.py --data $(DEMO_BRAIN)
	$(PY) benchmarks/bench_brain.py --data $(DEMO_BRAIN) --runtime openvino-int8
	$(PY) benchmarks/bench_runtimes.py

clean:
	rm -rf $(DEMO) bench_output .pytest_cache site
