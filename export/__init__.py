"""Host toolchain: models, random pruning, sparse training, meta-network warm-up, bundle export.

Needs the `export` extra (PyTorch, ONNX). Never imported on the device."""
