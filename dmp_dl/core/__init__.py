"""The bottom layer: errors, atomic file writes, logging and the command-line error handling.
Imports nothing else from dmp_dl."""
