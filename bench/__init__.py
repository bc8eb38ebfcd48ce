"""Benchmarks and studies of scale: run from the repository root as modules, e.g. `python -m bench.train_step`.

They import the library (`scale`) and each other explicitly (`bench.common` holds what several share);
nothing here is on the library's import path or loaded by file path.
"""
