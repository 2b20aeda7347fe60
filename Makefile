# Quick start: `make demo` and `make test` on a fresh machine (CPU, package registries only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test venv clean

# timm 0.6.5 wrote the official OFA-KD/RSD/PAT teachers; the layout tests run it in a subprocess
# (two timm versions cannot share a process), so it lives beside the venv, not in it.
TIMM065 := $(VENV)/timm065

venv: $(VENV)/.installed $(TIMM065)/.installed

# torch is pinned by constraints.txt: an unpinned torch (pulled in by timm) brings GBs of CUDA.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# --no-deps: it runs on the venv's torch.
$(TIMM065)/.installed: $(VENV)/.installed
	rm -rf $(TIMM065)
	$(PY) -m pip install --quiet --no-deps --target $(TIMM065) timm==0.6.5
	touch $@

demo: venv
	$(PY) -m jaxkd.main --config=configs/rsd_digits.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q -n 2 --durations=25 tests

clean:
	rm -rf $(VENV) runs
