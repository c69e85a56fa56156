"""Core: the shared machinery under every stage, with no knowledge of any stage.

Database sessions, configuration, errors, logging, file I/O, storage backends, tar
reading and writing, liveness and heartbeats, the row-task claims, queue routing, hosts and
transfer methods, buffer state and room.  Imports only :mod:`ccat_ops_db` and libraries.
"""
