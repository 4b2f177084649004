"""bench/benchmark.py's headings (the sections themselves need a full-size checkpoint: run by hand, see bench/)."""
from __future__ import annotations

import sys

from conftest import ROOT


def test_store_heading_names_the_store_dtype(monkeypatch):
    """The feature-store bytes are in store.dtype (float16 by default), whatever dtype the model runs in."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])  # restored after (benchmark.py adds ROOT)
    import benchmark
    import pipeline_bench

    monkeypatch.setattr(pipeline_bench, "store_section", lambda weights, dtype: ["| rows |"])
    heading = benchmark.store_section(ROOT / "unused.safetensors", dtype="bfloat16")[0]
    assert heading == "Feature store, store.dtype float16 (model dtype bfloat16)"
