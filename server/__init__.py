"""The HTTP side of Stepstream: the app, its routes, the hub and SSE streams."""
