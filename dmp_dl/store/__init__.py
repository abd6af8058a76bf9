"""The artifact bundle: its writer and reader, the manifest, and the part interface the layers
above implement. Imports only :mod:`dmp_dl.core` and :mod:`dmp_dl.index`."""
