"""The HTTP service behind ``serve.py`` (FastAPI): routes, request models and error responses."""
