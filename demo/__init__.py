"""The loramerge demo: locally built assets, the end-to-end workflow and `make serve`."""
