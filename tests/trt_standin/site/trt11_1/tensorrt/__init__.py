"""TensorRT 11.1.0 stand-in (JetPack 7 (no DLA in 11.0-11.3)): a contract-test fixture of edgecnn's tests, not TensorRT."""
from trt_standin.module import install_from_environment

install_from_environment(__name__, "11.1.0")
