"""Evaluation: lm-evaluation-harness run natively on our GPT (lm_eval_harness.py), validation loss and perplexity
(perplexity.py), the seeds' benchmark suites (suites.py)."""
