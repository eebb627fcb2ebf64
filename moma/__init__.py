"""MoMA (arXiv 2404.05674) as pure torch + transformers: no ComfyUI import anywhere in this package."""
