"""speft: sparse parameter-efficient fine-tuning with salience-selected masks."""

import logging

__version__ = "0.1.0"

# A quantized base (speft.models.quantization) runs on bitsandbytes, which peft imports whenever it is installed.
# Its CPU backend looks for an optional kernel download at import and logs a warning when the Hub cannot be
# reached (and the kernels package another, offline); it falls back to its own CPU kernel, which is what runs
# here (and offline).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "gemm_4bit_forward" not in r.getMessage())
logging.getLogger("kernels._internals.hf_hub").addFilter(lambda r: "quantization-bitsandbytes" not in r.getMessage())
# int8 matmuls take fp16 inputs (the int8 base's documented precision): bitsandbytes warns on every call with fp32
# or bf16 activations.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda r: "inputs will be cast" not in r.getMessage())
