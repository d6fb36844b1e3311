# Convenience targets; each provisions the host first (scripts/setup.sh, root).
.PHONY: setup run test lint bench install-service

setup:
	bash scripts/setup.sh

run: setup
	egress-auditor trace --duration 60

test:
	bash scripts/test.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check egress_auditor

bench: setup
	.venv/bin/python bench/run.py

install-service: setup
	bash scripts/install-service.sh
