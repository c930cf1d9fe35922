"""Kept for the command in older notes: the torch-free ONNX predictor is ``finetune.onnx_predict``,
installed as ``finetune-predict-onnx`` (``python -m finetune.onnx_predict`` does the same)."""

import sys

from finetune.onnx_predict import main

if __name__ == "__main__":
    sys.exit(main())
