"""The ASGI entry point: /v1 (the data plane) goes to a lean Django handler, everything else to
Django's standard one. The model calls (chat, embeddings, messages, responses) skip even the lean
handler: apps/gateway/asgi.py serves them straight from ASGI.

The data-plane handler runs the middleware listed in settings.GATEWAY_MIDDLEWARE only (no
sessions, CSRF, auth or messages: /v1 authenticates by API key), and does not wrap each request in
its own ThreadSensitiveContext: Django's default starts a fresh thread per request for that, and
closes the response through it, which measured at about a third of the gateway's CPU time (see
docs/benchmark.md). The data plane reaches the database through the async ORM (the process' one
sync thread) or its own async pool, and closes connections itself.
"""

import asyncio
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402 - after setup
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402

from apps.analytics.journal import replay_in_background  # noqa: E402
from apps.analytics.services import ledger_writers_release  # noqa: E402
from apps.billing.budgets import settles_drain  # noqa: E402
from apps.core import load  # noqa: E402
from apps.core.db import server_loop_mark  # noqa: E402
from apps.gateway import asgi as direct  # noqa: E402

replay_in_background("web start-up")  # ledger rows journaled while the database was down


class DataPlaneHandler(ASGIHandler):
    """Django's ASGI handler with the data plane's middleware, and no per-request thread."""


    def load_middleware(self, is_async=True):
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = convert_exception_to_response(self._get_response_async)
        for path in reversed(settings.GATEWAY_MIDDLEWARE):
            middleware = import_string(path)
            if not getattr(middleware, "async_capable", False):
                raise RuntimeError(f"{path}: data-plane middleware must be async-capable")
            instance = middleware(handler)
            if hasattr(instance, "process_view"):
                self._view_middleware.insert(0, self.adapt_method_mode(True, instance.process_view))
            if hasattr(instance, "process_exception"):
                self._exception_middleware.append(self.adapt_method_mode(False, instance.process_exception))
            handler = convert_exception_to_response(instance)
        self._middleware_chain = handler

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """ASGIHandler.handle, with the request signals sent and the response closed in the event
        loop: the data plane holds no Django DB connection in this thread, so nothing they do blocks."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        # Sent synchronously: its receivers (close_old_connections, reset_queries) have nothing to do
        # in this thread, and `asend` would hop to a thread for them.
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        async def process_request():
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass
            return response

        # As Django does: a client that goes away cancels the view (a stream then bills what it sent).
        tasks = [asyncio.create_task(self.listen_for_disconnect(receive)), asyncio.create_task(process_request())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            signals.request_finished.send(sender=self.__class__)
        else:
            response.close()
        body_file.close()


data_plane_application = DataPlaneHandler()


async def lifespan(receive, send) -> None:
    """The server's start and stop: at stop, the budget settles still finishing after their answers
    are awaited (apps.billing.budgets.Hold.settle), so a graceful shutdown leaves no hold open, and
    the ledger writers give back the connections they keep."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await settles_drain()
            await ledger_writers_release()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        server_loop_mark()  # this loop serves until the process ends: it may keep a DB pool
        if settings.GATEWAY_LEAN_DATA_PLANE:
            load.started()  # the requests in flight, whichever path serves them (apps.core.load)
            try:
                if settings.GATEWAY_DIRECT_ROUTES and (view := direct.view_for(scope)) is not None:
                    return await direct.serve(view, scope, receive, send)
                return await data_plane_application(scope, receive, send)
            finally:
                load.finished()
    return await django_application(scope, receive, send)
