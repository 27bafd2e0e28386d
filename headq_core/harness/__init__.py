"""The evaluation harness: loading models and text, decode perplexity, diagnostics and benchmarks.

Each concern lives in its own module (:mod:`headq_core.harness.loading` for models,
:mod:`headq_core.harness.texts` for text, ...); import from there.
"""

from __future__ import annotations
