"""Model building blocks: tensor-parallel linears and embeddings, norms, rotary
embeddings, and the context-parallel attention layer."""
