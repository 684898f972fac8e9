"""Verification: what verify measures (measure), the engines of a recipe (engines), any dense/sparse pair without a
recipe (external, onnx_files, plans), the 2:4 layout of a sparse model (layout), the report (report, output) and
stability certificates (certify)."""
