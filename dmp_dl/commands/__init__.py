"""The command-line programs (``python -m dmp_dl.audience | export | privacy | evaluate``). The
documented ``python -m`` names are thin modules that call these."""
