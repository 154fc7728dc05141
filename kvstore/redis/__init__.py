"""Everything that speaks to a Redis-protocol server.

==================  ==============================================================
module              holds
==================  ==============================================================
``store``           ``RedisPackageStore``: the contract over one namespace
``options``         ``StoreOptions``: every option of a store, checked in one place
``keyspace``        every key of a namespace, and how text becomes key bytes
``scripts``         the server-side Lua of the top-level ``lua/`` folder: one Redis
                    Functions library, built, named by its digest and loaded
``protocol``        what this package and its Lua library both say (refusals, the
                    route-change message), and pairs as RESP2 and RESP3 send them
``wire``            commands in the Redis protocol (RESP), packed for sending
``pipeline``        concurrent calls coalesced into pipelines on held connections
``retry``           the retry policy: what is transient, backoff, the budget
``route_table``     the route cache's version rules, with no I/O
``route_cache``     every route in memory, kept true by the server's announcements
``archive_cache``   archives held in blobs kept on local disk, named by their
                    digest, verified on every read (``archive_cache=DIR``)
``failures``        every failure as ``BackendError`` naming the server, no password
                    in it
``urls``            clients made from URLs
``telemetry``       OpenTelemetry spans and metrics of a store's calls (imported
                    only by a store made with ``telemetry=True``)
==================  ==============================================================
"""
