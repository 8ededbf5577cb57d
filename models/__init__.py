"""Atelier's science: pure functions and small modules of torch/diffusers (see DESIGN.md)."""
