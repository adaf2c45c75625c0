"""Python-backend model files that :mod:`export.triton_repo` copies into a Triton model repository.

Each file becomes ``<model>/1/model.py`` and runs inside the server's Python backend, where the module
``triton_python_backend_utils`` exists; they are not imported by the ``pdd`` package itself.

* ``preprocess.py``  uint8 pixels or encoded image bytes -> normalised float batch;
* ``ort_engine.py``  the portable ONNX under ONNX Runtime (for servers with the Python backend only);
* ``postprocess.py`` scores and maps -> ``pred_label`` / ``pred_mask`` with the export threshold.
"""
