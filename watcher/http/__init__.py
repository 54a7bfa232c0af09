"""The daemon's HTTP faces, on aiohttp: the probe listener and the job API listener.

Why a package: the two listeners share one way of bounding what a connection may cost
(``listener``), request ids and the one error shape (``replies``), and the API adds its
own concerns (``auth``: tokens and TLS; ``api``: observation, auth, body limits;
``job_routes``: the routes) that the probes never need.
aiohttp rather than a parser of our own: a well-kept HTTP/1.1 stack with TLS, client
certificates and request limits, which a job API with bodies and clients needs.
"""

from watcher.http.probes import HttpServer, Readiness

__all__ = ["HttpServer", "Readiness"]
