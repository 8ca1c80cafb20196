"""Fewer image tokens: the reductions a `tokens` stage installs on a model, and where they live.

This package owns the arithmetic that turns a tower's n patch features into k < n tokens (`reduce`: grid
pooling, VisionZip-style selection + merging, each a fixed-shape tensor program that traces into ONNX),
and the installation of one such reduction in front of a model's projector, recorded in the model's
config (`install`: the record, the hook, re-installing it when a checkpoint is loaded). The prompt side
(how many image placeholder tokens a prompt carries) is the family adapter's, which reads the record.
"""
