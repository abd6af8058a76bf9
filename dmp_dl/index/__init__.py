"""Nearest-neighbour indexes (FAISS) over the user and item vectors. Imports only :mod:`dmp_dl.core`."""
