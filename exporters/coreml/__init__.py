"""Core ML: the converter (``export``), the W8A8 recipe of the INT8 engine (``w8a8``), the MIL reference
executor (``mil_reference``) and the runners (``runner``: the executor, or ``MLModel.predict`` on macOS)."""
