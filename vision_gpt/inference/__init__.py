"""Using a trained model: the one loader (PyTorch or ONNX Runtime; dtypes, devices, remote code), the one check of
decoding settings, caption scores, ONNX Runtime decoding and `VisionGPTCaptioner` for data engines."""
