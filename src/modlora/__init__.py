"""modlora: build and reuse libraries of LoRA experts (Ostapenko et al., ICML 2024)."""

__version__ = "0.1.0"
