"""Build-time artifacts of the SHARP network: exported program, ONNX, TensorRT engine.

Entry point: `export.build_engine.main(argv)` (`python export/build_engine.py --help`).
"""
