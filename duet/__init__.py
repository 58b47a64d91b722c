"""duet: a solver and a critic that reason with code, on a local DeepSeek-V3-architecture runtime."""

__version__ = "0.1.0"
