"""After export: evaluate an artifact as the service runs it, and promote it over the served one.

This package sits downstream of all three parts (model/ -> export/ -> service/ -> release/): it
opens datasets with model/, runs artifacts with the service's own decoding and session, and none
of the three imports it (tests/test_layout.py).
"""
