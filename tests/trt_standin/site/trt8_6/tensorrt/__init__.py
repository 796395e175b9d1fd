"""TensorRT 8.6.2.3 stand-in (JetPack 6.0): a contract-test fixture of edgecnn's tests, not TensorRT."""
from trt_standin.module import install_from_environment

install_from_environment(__name__, "8.6.2.3")
