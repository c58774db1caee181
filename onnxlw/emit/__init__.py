"""Writers of compressed ONNX models."""
