"""Benchmarks: faithfulness (perturbation) and cost (time, memory) — ``lxt bench ...``."""
