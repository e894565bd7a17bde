"""Tests of `sidecar.config`, one module per module of the package.

`tests.config.files` writes config files and catches the errors of loading
them. The same bad configs through the real command line are in
tests/test_cli.py; here are the rules that are cheaper to check in-process.
"""
