"""The dashboard and the browser client: files, served as they are (no build step).

A package only so that ``importlib.resources.files("stepstream.static")`` names one directory,
in a wheel and in an editable install alike.
"""
