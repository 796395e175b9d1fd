"""TensorRT 11.4.1 stand-in (JetPack >= 7.2.2 (DLA on AGX Orin)): a contract-test fixture of edgecnn's tests, not TensorRT."""
from trt_standin.module import install_from_environment

install_from_environment(__name__, "11.4.1")
