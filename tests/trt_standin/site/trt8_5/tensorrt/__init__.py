"""TensorRT 8.5.2.2 stand-in (JetPack 5.1 (Python 3.8)): a contract-test fixture of edgecnn's tests, not TensorRT."""
from trt_standin.module import install_from_environment

install_from_environment(__name__, "8.5.2.2")
