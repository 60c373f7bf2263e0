"""The fusion model: the contract a model file keeps (`contract`, no torch), the
network (`config`, `blocks`, `rgb`, `hsi`, `fusion`, `decoder`, `net`: torch),
the inference `backends` (ONNX Runtime and TensorRT need no torch), and
`training` (data sets, training, evaluation, ONNX export, engine builds)."""
