"""Evaluation: lm-evaluation-harness adapter, suites, report tables, perplexity, MT-Bench."""
