# stemlive: set-up and the two everyday commands (`make demo`, `make test`).
# Creates .venv with Python 3.11 and installs stemlive with its simulation and training extras.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: demo test test-all libraries check-data demo-library atom-models bench clean-venv browser

# Debian's chromium + chromium-driver for the dashboard's browser tests (no browser downloads at
# test time); installed once with apt (sudo when not root).
CHROMIUM := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "stemlive needs Python >= 3.11"' \
	  || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# exactly 2.13.0 (a CPU wheel): any other torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[sim,train,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stemlive demo

$(CHROMIUM):
	@echo "installing Debian chromium and chromium-driver for the browser tests"
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

browser: $(CHROMIUM)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The default training libraries (issue 2): SrTiO3 [001], 200 kV, into the user cache.
# Resumable: rerun after an interruption.  ~46 min wall on 2 cores (benchmarks/library_speed.py).
libraries: $(STAMP)
	$(BIN)/stemlive simulate pacbed --alpha 13.6 --thickness 1 120 1
	$(BIN)/stemlive simulate pacbed --alpha 19.1 --thickness 1 80 1

# Rebuilds the library check's data shipped in models/shipped (models/checked_analysis.py) from the
# training libraries in the user cache (`make libraries`): each library in the canonical frame,
# first-quadrant tilts, compressed to 384 principal components (float16; 12.9 MB for 13.6 mrad,
# ~1:45 on 2 cores).  A setting whose library is not in the cache is skipped with a note.
CACHE_LIBS := $(or $(STEMLIVE_CACHE),$(HOME)/.cache/stemlive)/libraries
check-data: $(STAMP)
	@for a in 13.6 19.1; do \
	  lib=$(CACHE_LIBS)/pacbed_SrTiO3_001_200kV_$${a}mrad.h5; \
	  if [ ! -f $$lib ]; then echo "skipped $$a mrad: $$lib is missing (make libraries)"; continue; fi; \
	  $(BIN)/stemlive simulate compact-library $$lib --rank 384 --overwrite \
	    --out models/shipped/pacbed_SrTiO3_001_200kV_$${a}mrad_check.h5 || exit 1; \
	done

# Rebuilds the position-resolved libraries shipped in simulate/data.  The demo scan's: 97² px
# frames at 1.28 mrad/px (sampled as a PACBED recording is), exit planes 3.9 nm apart, tilts
# 0/±1.25/±2.5 mrad, 8×8 positions; abTEM into the user cache (resumable), then packed to 24 MB
# (5 significant bits, see simulate/scan.py pack_library): 313 CPU-s of abTEM, 6:52 wall on 2 cores
# shared with other jobs (~3 min alone), + 2 min packing.  Then the 41-px one the tests and
# benchmarks use (kept as it is when present).
DEMO_RAW := $(or $(STEMLIVE_CACHE),$(HOME)/.cache/stemlive)/libraries/cbed-positions-97px_SrTiO3_001_200kV_13.6mrad_full.h5
demo-library: $(STAMP)
	$(BIN)/stemlive simulate pacbed --alpha 13.6 --kv 200 --thickness 8 56 4 --tilts "0 1.25 2.5" \
	  --signed-tilts --max-angle 61.2 --positions 8 8 --keep-positions --seed 13 --out $(DEMO_RAW)
	$(BIN)/python -m stemlive.simulate.scan_cli pack $(DEMO_RAW) \
	  simulate/data/cbed-positions-97px_SrTiO3_001_200kV_13.6mrad.h5
	$(BIN)/stemlive simulate pacbed --alpha 13.6 --kv 200 --thickness 8 56 2 --tilts "0 1.5 3" \
	  --signed-tilts --max-angle 61.2 --pixels 41 --positions 8 8 --keep-positions \
	  --out simulate/data/cbed-positions_SrTiO3_001_200kV_13.6mrad.h5

# The shipped atom networks (issue 6), reproduced: simulated images into the user cache, then
# training (resumable; HAADF ~35 min, then ~11 min more with made-up lattices mixed in, continuing
# from the same checkpoint; ABF ~37 min; 2 cores) into models/shipped.
ATOMS := $(HOME)/.cache/stemlive/atoms
atom-models: $(STAMP)
	$(BIN)/stemlive simulate images --out $(ATOMS)/haadf.h5 --n 4000 --seed 1
	$(BIN)/stemlive simulate images --out $(ATOMS)/abf.h5 --n 2000 --seed 2 --contrast abf
	$(BIN)/stemlive simulate images --out $(ATOMS)/haadf_rl.h5 --n 3000 --seed 3 --random-lattices 0.35
	$(BIN)/stemlive train atoms --images $(ATOMS)/haadf.h5 --name atoms_haadf --steps 5000
	$(BIN)/stemlive train atoms --images $(ATOMS)/haadf_rl.h5 --name atoms_haadf --steps 6500
	$(BIN)/stemlive train atoms --images $(ATOMS)/abf.h5 --name atoms_abf --steps 3000

bench: $(STAMP)
	$(BIN)/python benchmarks/library_speed.py
	$(BIN)/python benchmarks/phonon_convergence.py
	$(BIN)/python benchmarks/pacbed_accuracy.py
	$(BIN)/python benchmarks/pacbed_speed.py
	$(BIN)/python benchmarks/pacbed_bandpass.py
	$(BIN)/python benchmarks/live_throughput.py
	$(BIN)/python benchmarks/dashboard_latency.py
	$(BIN)/python benchmarks/atom_contrast_calibration.py
	$(BIN)/python benchmarks/atom_accuracy.py

clean-venv:
	rm -rf $(VENV)
