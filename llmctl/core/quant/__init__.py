"""Weight quantization: number formats, quantizers (registered strategies) and quantized linear modules."""
