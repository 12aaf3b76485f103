"""What the tests share: servers, clients and helpers, each in one place.

Test modules import from here, never from each other.

``relays``      the proxy in-process (``run_relay``) or as its own process (``spawn_relay``)
``loopback``    the one loopback server base (and HTTP/1.1 request parsing) under the
                ``scripted``, ``recording`` and ``chaos`` upstreams
``wire``        the raw-wire client: exact request bytes out, responses parsed by hand
``metrics``     the one metrics scraper and its sample arithmetic
``http``        httpx clients sharing one TLS context (one CA bundle load, not one a client)
``net``         ports (``free_port``) and bounded waits on a condition
``tracing``     in-memory tracing for a relay in the test process
``otlp``, ``prometheus``, ``rules``, ``k8s``, ``dashboards``, ``tools``: the real tools and
                the shipped artefacts they check
``tiers``       the ``live`` marker's guard: a helper that starts a process or a tool
                refuses to run in a test not marked ``live``
``logs``        the access records a test reads (the ``access`` fixture of conftest.py)
``tls``         certificates (``trustme``), their files as a Secret volume lays them out,
                and an HTTPS upstream recording each handshake
``dns_server``  a DNS server on 127.0.0.1 answering from records the test edits
``endpoints``   scripted servers on several loopback addresses sharing a port, as the
                pods behind one name, each stopped and started on its address
``ws_upstream``  a real WebSocket upstream (the ``websockets`` server): echo, refusal,
                close codes, vanishing, and the handshakes it received
``worker_hooks``, ``app_hook_example``: ``server.app_hook``s the tests name in configs;
``bulk_upstream``: a script the streaming tests run as a process of its own
"""
