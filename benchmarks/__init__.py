"""Benchmarks of PDD: end-to-end runtimes (``run.py``), kernels, export, serving; results in ``results/``.

Each script runs as ``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>`` with the project
installed (``pip install -e .``): they import ``pdd``, ``kernels`` and ``export`` as installed packages.
"""
