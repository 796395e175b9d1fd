"""ONNX: the exporter (``export``), the ``ort`` INT8 recipe (``quant``), the onnxruntime runner (``runner``)
and small graph helpers (``graph``)."""
