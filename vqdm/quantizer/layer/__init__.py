"""Per-layer algorithms: additive quantization (k-means init, Adam, beam search), the GPTQ / RTN
scalar baselines, and the relative output error they are all measured by. Pure tensor code: no
models, files or pipelines."""
