"""The HTTP gateway (``ident serve``): the fleet behind plain HTTP, for services that hold no Celery client.

It only sends jobs by name and reads their results; no model, numpy or OpenCV
is imported here (tests/gateway/test_imports.py), so it starts in a second and
scales apart from the workers. docs/gateway.md is the guide.
"""
