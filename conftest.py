# Here so that a bare `pytest` (the console script) finds the project's packages as `python -m pytest`
# does: pytest puts the folder of a conftest.py on sys.path. The fixtures are in tests/conftest.py.
