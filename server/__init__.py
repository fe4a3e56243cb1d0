"""The HTTP side of Stepstream: the app, its routes, the hub and SSE streams.

To serve Stepstream from inside another Starlette or FastAPI app::

    from stepstream.server import create_app

    progress = create_app()
    app = FastAPI(lifespan=progress.lifespan)
    app.mount("/progress", progress)
"""

from stepstream.server.app import StepstreamApp, create_app

__all__ = ["StepstreamApp", "create_app"]
