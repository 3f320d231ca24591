"""The pipeline as library functions: one module per stage, each a typed-params-in, metrics-out function that
reads and writes a :class:`ramp.pipeline.workspace.Workspace` (``data/<stage>/`` folders, atomic outputs).

Every front door calls these: the DVC stage scripts (``stages/<name>.py``), the ``ramp`` CLI and the benchmarks
(:func:`ramp.pipeline.run.run_pipeline`, a params overlay over ``params.yaml`` in a workspace of their own).
This ``__init__`` imports nothing, so a stage's code dependencies are exactly what its module imports.
"""

STAGES = ("calibrate", "embed", "fold", "sensitivity", "train", "allocate", "quantize", "evaluate", "export")
