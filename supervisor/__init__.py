"""llama-supervisor: keeps llama.cpp's llama-server alive and useful on edge boxes."""

__version__ = "0.1.0"
