"""TensorRT: the portable bundle (``bundle``), the ``trt`` Q/DQ INT8 recipe (``quant``), the Q/DQ rule checker
(``qdq_check``) and the standalone on-device tool (``device``, shipped as ``edgecnn_trt.py``)."""
