"""The MNIST files: their checksums, the IDX format, the processed splits, and where to download them."""
