"""The names `distsparse export` offers (no imports: the command line's parser reads them)."""

__all__ = ["DTYPE_NAMES", "FORMATS"]

FORMATS = ("sparse", "dense", "onnx")
"""sparse: bit-packed masks and active values (safetensors); dense: the state dict (safetensors);
onnx: torch.onnx.export, checked with onnxruntime."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""--dtype choices: floating-point tensors are written in it; integer buffers stay as they are."""
