"""RAMP: reinforcement-learned mixed-precision GGUF quantization."""
