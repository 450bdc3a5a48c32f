"""Deploy-ready outputs for compressed language models (see :mod:`lfgraph.deploy.folder`)."""
