"""Making models: data sets, training, evaluation, checkpoints, ONNX export and TensorRT
engine builds. Everything here needs the .[train] extra (torch); inference does not."""
