.PHONY: install test test-fast lint bench eval

install:
	deploy/install.sh

test:
	deploy/install.sh --test && .venv/bin/python -m pytest -q -n auto

test-fast:
	.venv/bin/python -m pytest -q -m "not slow" -n auto

lint:
	.venv/bin/ruff check node pipelines tests bench
	.venv/bin/ruff format --check node pipelines tests bench
	.venv/bin/python -m mypy
	.venv/bin/lint-imports

bench:
	.venv/bin/python bench/ingest.py
	.venv/bin/python bench/ingest_attack.py
	.venv/bin/python bench/stow.py
	.venv/bin/python bench/api.py
	.venv/bin/python bench/embedding.py
	.venv/bin/python bench/jobs.py
	.venv/bin/python bench/qr.py
	.venv/bin/python bench/lung_quant.py
	.venv/bin/python bench/seg_encoding.py
	.venv/bin/python bench/latency.py
	.venv/bin/python bench/pipelines.py
	.venv/bin/python bench/scale.py
	.venv/bin/python bench/cli.py

eval:
	.venv/bin/python bench/evaluate.py
	.venv/bin/python bench/evaluate_models.py --config config.example.yaml
	.venv/bin/python bench/evaluate_guard.py
	.venv/bin/python bench/evaluate_haa.py
