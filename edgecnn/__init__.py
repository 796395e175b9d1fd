"""edgecnn: classic image-classification CNNs -> validated edge artefacts (ONNX, TensorRT, Core ML).

Python API::

    import edgecnn
    result = edgecnn.export("mobilenet_v3", target="onnx", precision="fp32")
    print(result.summary())
"""
from __future__ import annotations

from .versions import edgecnn_version

__version__ = edgecnn_version()


def export(*args, **kwargs):
    """See ``edgecnn.pipeline.export``; imported lazily so ``import edgecnn`` stays light."""
    from .pipeline import export as _export

    return _export(*args, **kwargs)


__all__ = ["export", "__version__"]
