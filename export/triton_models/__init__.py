"""Python-backend model files that :mod:`export.triton_repo` copies into a Triton model repository.

Each file becomes ``<model>/1/model.py`` and runs inside the server's Python backend, where the module
``triton_python_backend_utils`` exists; they are not imported by the ``pdd`` package itself.

* ``preprocess.py``  uint8 pixels or encoded image bytes -> normalised float batch;
* ``ort_engine.py``  the ONNX under ONNX Runtime (for servers with the Python backend only): the plugin
  form's custom nodes run by the torch-free ops of ``kernels/ort_ops.py``, copied beside it with the C
  scan kernel's source (compiled by the server), or the portable form;
* ``postprocess.py`` scores and maps -> ``pred_label`` / ``pred_mask`` with the export threshold.
"""
