.PHONY: install test lint bench eval

install:
	deploy/install.sh

test:
	deploy/install.sh --test && .venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check node pipelines tests bench
	.venv/bin/ruff format --check node pipelines tests bench

bench:
	.venv/bin/python bench/ingest.py
	.venv/bin/python bench/jobs.py
	.venv/bin/python bench/lung_quant.py
	.venv/bin/python bench/latency.py
	.venv/bin/python bench/pipelines.py

eval:
	.venv/bin/python bench/evaluate.py
	.venv/bin/python bench/evaluate_models.py --config config.example.yaml
