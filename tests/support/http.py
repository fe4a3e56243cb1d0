"""httpx's one-shot request functions (``get``, ``post``, ...), sharing one TLS context.

httpx builds a TLS context for every client it creates, loading the CA bundle: about 45 ms of
CPU, even for a plain-http URL. ``httpx.get`` creates a client per call, and the suite makes
thousands of such calls, many in loops that poll every 50 ms (a web process starting, a job
reaching a state), so that alone kept a core busy. These functions are ``httpx.get`` and the
rest with the context built once: each call still opens its own connection.
"""

from __future__ import annotations

from functools import partial

import httpx

TLS = httpx.create_ssl_context()

get = partial(httpx.get, verify=TLS)
post = partial(httpx.post, verify=TLS)
put = partial(httpx.put, verify=TLS)
delete = partial(httpx.delete, verify=TLS)
head = partial(httpx.head, verify=TLS)
request = partial(httpx.request, verify=TLS)
stream = partial(httpx.stream, verify=TLS)
