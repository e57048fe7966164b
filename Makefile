# postwarden: `make run` starts a working server on loopback, `make test` tests it.
# The interpreter of the virtualenv: Debian's python3, the one docs/deploy.md
# installs into, when it can make a venv; otherwise python3 from PATH.
# Debian's has libpython linked into its executable; a plain source build
# such as pyenv's calls a shared libpython and ran the server with 7-10%
# more CPU per message (docs/performance.md).
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null \
                  && echo /usr/bin/python3 || echo python3)
VENV   := .venv
BIN    := $(VENV)/bin
VAR    := var
CONFIG := $(VAR)/postwarden.toml
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-quick clean venv crash fuzz soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

$(CONFIG): | $(STAMP)
	$(BIN)/postwarden init --non-interactive --dir $(VAR) --domain example.test \
	    --hostname mail.example.test --listen-host 127.0.0.1 \
	    --mx-port 2525 --submission-port 5870 --submissions-port 4650

run: $(STAMP) $(CONFIG)
	@echo
	@echo "postwarden is starting on 127.0.0.1: mx 2525, submission 5870 (STARTTLS), submissions 4650 (TLS)."
	@echo "Send a first mail (use the postmaster password printed by init):"
	@echo "  swaks --server 127.0.0.1:5870 --tls --auth PLAIN \\"
	@echo "        --auth-user postmaster@example.test --auth-password 'THE-PASSWORD-INIT-PRINTED' \\"
	@echo "        --from postmaster@example.test --to postmaster@example.test"
	@echo "It lands in $(VAR)/data/mail/example.test/postmaster/Maildir/new/"
	@echo
	$(BIN)/postwarden -c $(CONFIG) serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# postwarden vs a private Postfix on loopback (needs root and Postfix; see
# docs/performance.md). bench: the full run (about 10 minutes), written to
# docs/performance.md (every run as JSON in bench/results/, not committed).
# bench-quick: a < 2 minute smoke test of the harness.
bench: $(STAMP)
	$(BIN)/python -m bench.compare --docs docs/performance.md --json bench/results/last-run.json

bench-quick: $(STAMP)
	$(BIN)/python -m bench.compare --quick

# Proof of reliability (docs/reliability.md), the long versions of what the
# suite runs briefly: 50 SIGKILL rounds under load; 20000 fuzz inputs per
# parser; a 10-minute soak with faults injected.
PYTEST_LONG = $(BIN)/python -m pytest -q -s -p no:cacheprovider -o timeout=0 \
               --basetemp=/tmp/postwarden-$@

crash: $(STAMP)
	POSTWARDEN_CRASH_ROUNDS=$${ROUNDS:-50} $(PYTEST_LONG) tests/test_crash.py

fuzz: $(STAMP)
	POSTWARDEN_FUZZ_EXAMPLES=$${EXAMPLES:-20000} $(PYTEST_LONG) tests/test_fuzz.py

soak: $(STAMP)
	POSTWARDEN_SOAK_SECONDS=$${SECONDS_:-600} $(PYTEST_LONG) tests/test_soak.py
