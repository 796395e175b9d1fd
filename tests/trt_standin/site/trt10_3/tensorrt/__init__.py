"""TensorRT 10.3.0.30 stand-in (JetPack 6.1 / 6.2): a contract-test fixture of edgecnn's tests, not TensorRT."""
from trt_standin.module import install_from_environment

install_from_environment(__name__, "10.3.0.30")
