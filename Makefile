# Two commands: `make demo` (install, prepare Shakespeare, train the tiny model, sample) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RUN     ?= runs/shakespeare-tiny
PROMPT  ?= HAMLET.\n

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch pinned: on this CPU machine 2.13.0 is the on-disk CPU wheel (an unpinned torch pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmstack prepare shakespeare
	@if [ -e $(RUN)/checkpoint ]; then echo "$(RUN) holds a trained run: sampling from it (make clean to train anew)"; \
	else $(BIN)/lmstack train --recipe recipes/shakespeare-tiny.yaml out_dir=$(RUN); fi
	$(BIN)/lmstack generate --checkpoint $(RUN)/checkpoint --prompt "$(PROMPT)" --max-new-tokens 240 --temperature 0.8 --top-k 50 --seed 0

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/cpu_vs_hf.py

clean:
	rm -rf $(VENV) runs
