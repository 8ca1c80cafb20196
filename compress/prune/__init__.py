"""Pruning: unstructured and n:m sparsity by magnitude, Wanda or SparseGPT (`sparsity`, weights zeroed in
place), and structured pruning that removes heads, MLP channels and layers for a smaller model
(`structured`, the config edited and the model rebuilt)."""
