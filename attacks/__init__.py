"""Hostile clients: the attack catalogue and the mutation fuzzer, with the client code they send
through. Shared by the tests (tests/test_hostile.py, one test per case) and ``ssd bench hostile``
(every case at once beside normal load), so it ships with the installed command."""
