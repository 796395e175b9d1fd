"""The one INT8 engine (``engine``) and its parts: options, weight rounding, bias correction, the
sensitivity fallback, and the recipe for ONNX Q/DQ quantizers (``qdq``)."""
