"""quantbench: quantize a causal LM every way, evaluate, benchmark, report, and run the winner."""

# quantbench.engine registers its Triton kernels as the CUDA forward of quantized layers (quant/ cannot
# import the engine, a higher layer): imported here, every command and library user gets them
import quantbench.engine  # noqa: F401
from quantbench.checkpoint import load_quantized, save_quantized
from quantbench.errors import CheckpointError, ModelLoadError, QuantbenchError, QuantConfigError
from quantbench.models import DEFAULT_MODEL, load_model, random_model
from quantbench.quant import METHODS, QuantConfig, parse_spec, quantize, weight_report

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "CheckpointError",
    "ModelLoadError",
    "QuantConfig",
    "QuantConfigError",
    "QuantbenchError",
    "load_model",
    "load_quantized",
    "parse_spec",
    "quantize",
    "random_model",
    "save_quantized",
    "weight_report",
]
