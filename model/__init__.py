"""Torch modules: item encoder, CSRC codebook, coarse and refined branches, DMIL loss, retrieval."""
